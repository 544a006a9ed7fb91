//! Test support: a MongoDB (mongo-sim, or `TEST_MONGODB_URI`), changecast on port 0, tokens and WebSocket clients.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bson::Document;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use changecast::app::{self, AppHandle, RunOptions};
use changecast::config::Config;

/// The HMAC secret every test token is signed with.
pub const SECRET: &str = "changecast-integration-test-secret-0123456789";
/// The env var the test configs name in `auth.secret_env`.
pub const SECRET_ENV: &str = "CHANGECAST_IT_JWT_SECRET";

/// A database for one test: a private mongo-sim, or a unique database on `TEST_MONGODB_URI`.
pub struct Db {
    pub sim: Option<mongo_sim::SimHandle>,
    pub uri: String,
    pub name: String,
    pub client: mongodb::Client,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Whether tests run against an external server (no sim-only features such as fail points).
pub fn external() -> bool {
    std::env::var("TEST_MONGODB_URI").is_ok_and(|u| !u.is_empty())
}

/// The server the tests talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// mongo-sim: a private one per test, or one at `TEST_MONGODB_URI`.
    MongoSim,
    /// SecantusDB at `TEST_MONGODB_URI`.
    Secantus,
    /// Anything else at `TEST_MONGODB_URI`: taken for MongoDB.
    MongoDb,
}

impl Backend {
    /// Tells the server at `client` apart by its `buildInfo`: SecantusDB adds `secantusVersion`,
    /// mongo-sim's `gitVersion` is `mongo-sim`.
    pub async fn of(client: &mongodb::Client) -> Backend {
        let info = client
            .database("admin")
            .run_command(bson::doc! {"buildInfo": 1})
            .await
            .expect("buildInfo");
        if info.contains_key("secantusVersion") {
            Backend::Secantus
        } else if info.get_str("gitVersion") == Ok("mongo-sim") {
            Backend::MongoSim
        } else {
            Backend::MongoDb
        }
    }
}

/// The server the tests talk to: mongo-sim without `TEST_MONGODB_URI`, else asked once.
pub async fn backend() -> Backend {
    static BACKEND: tokio::sync::OnceCell<Backend> = tokio::sync::OnceCell::const_new();
    if !external() {
        return Backend::MongoSim;
    }
    *BACKEND
        .get_or_init(|| async {
            let uri = std::env::var("TEST_MONGODB_URI").unwrap();
            // A client of its own: a client is bound to the runtime that made it, and every
            // test has its own runtime.
            let client = mongodb::Client::with_uri_str(&uri).await.expect("client");
            Backend::of(&client).await
        })
        .await
}

/// Prints `SKIP <test>: <reason>` (on stderr, and appended to the file `IT_SKIP_LOG` names,
/// which scripts/it-secantus lists at the end: nextest shows no output of passing tests).
/// Call it, then return: a skipped test is one that did not run, said out loud.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIP {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("IT_SKIP_LOG") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("IT_SKIP_LOG");
        writeln!(f, "{line}").expect("IT_SKIP_LOG");
    }
}

/// For a test that needs a mongo-sim feature (a fail point, a tiny oplog, stopping the
/// server): skips it with `needs` as the reason when the tests run elsewhere. True if skipped.
pub fn skip_unless_sim(test: &str, needs: &str) -> bool {
    if external() {
        skip(
            test,
            &format!("needs {needs} (TEST_MONGODB_URI is set, so no private mongo-sim)"),
        );
        return true;
    }
    false
}

impl Db {
    pub async fn start() -> Db {
        Self::start_with(mongo_sim::SimConfig {
            port: 0,
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(cfg: mongo_sim::SimConfig) -> Db {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("it_{}_{}", std::process::id(), n);
        let (sim, uri) = match std::env::var("TEST_MONGODB_URI") {
            Ok(uri) if !uri.is_empty() => (None, uri),
            _ => {
                let sim = mongo_sim::MongoSim::start(cfg)
                    .await
                    .expect("start mongo-sim");
                let uri = sim.uri();
                (Some(sim), uri)
            }
        };
        let client = mongodb::Client::with_uri_str(&uri).await.expect("client");
        Db {
            sim,
            uri,
            name,
            client,
        }
    }

    pub fn coll(&self, name: &str) -> mongodb::Collection<Document> {
        self.client.database(&self.name).collection(name)
    }
}

/// A config for `db` with a checkpoint file in `dir` plus `extra` TOML appended to `[server]`-free sections.
pub fn config(db: &Db, checkpoint: &std::path::Path, extra: &str) -> Config {
    std::env::set_var(SECRET_ENV, SECRET);
    let text = format!(
        r#"
[mongodb]
uri = "{uri}"
databases = ["{db}"]
connect_timeout = "5s"

[checkpoint]
store = "file"
path = "{cp}"
interval = "100ms"
every_events = 100

[auth]
algorithms = ["HS256"]
secret_env = "{env}"

{extra}
"#,
        uri = db.uri,
        db = db.name,
        cp = checkpoint.display(),
        env = SECRET_ENV,
    );
    Config::from_toml_str(&text, "test.toml").expect("test config")
}

/// A running changecast; stopped on drop.
pub struct Server {
    pub handle: Option<AppHandle>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

/// A client and an operations listener on free loopback ports.
pub async fn listeners() -> app::Listeners {
    app::Listeners {
        // As `run` binds it: tokio's default backlog (1024) resets connects in a storm.
        client: app::bind_listener("127.0.0.1:0".parse().unwrap()).unwrap(),
        ops: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
    }
}

impl Server {
    /// Wraps a started app.
    pub fn new(handle: AppHandle, dir: tempfile::TempDir) -> Server {
        Server {
            addr: handle.addr,
            handle: Some(handle),
            dir,
        }
    }

    pub async fn start(db: &Db, extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(db, extra, dir, RunOptions::default()).await
    }

    pub async fn start_in(
        db: &Db,
        extra: &str,
        dir: tempfile::TempDir,
        opts: RunOptions,
    ) -> Server {
        let cfg = config(db, &dir.path().join("checkpoint.json"), extra);
        let handle = app::start(&cfg, opts, listeners().await, None)
            .await
            .expect("start changecast");
        let s = Server::new(handle, dir);
        s.wait_ready().await;
        s
    }

    /// As `start`, but changecast (listener, driver, every task it spawns) runs on `runtime`
    /// instead of the caller's: its `changecast_runtime_tasks` then counts changecast's tasks
    /// only, not the test's clients, writers or an in-process mongo-sim.
    pub async fn start_on(runtime: &tokio::runtime::Handle, db: &Db, extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(db, &dir.path().join("checkpoint.json"), extra);
        let handle =
            runtime
                .spawn(async move {
                    app::start(&cfg, RunOptions::default(), listeners().await, None).await
                })
                .await
                .unwrap()
                .expect("start changecast");
        let s = Server::new(handle, dir);
        s.wait_ready().await;
        s
    }

    pub fn app(&self) -> &AppHandle {
        self.handle.as_ref().unwrap()
    }

    /// Waits until `/readyz` says the change streams are open (no sleeps on a fixed guess).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.app().health.is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "changecast never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) -> Result<(), changecast::app::AppError> {
        let h = self.handle.take().unwrap();
        h.stop();
        h.wait().await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// GET `path` from the listener that serves it: `/metrics` and `/readyz` live on the
    /// operations listener, everything else on the client one.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let ops = ["/metrics", "/readyz"].iter().any(|p| path.starts_with(p));
        match self.app().ops_addr {
            Some(addr) if ops => http_get(addr, path).await,
            _ => http_get(self.addr, path).await,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.stop();
        }
    }
}

/// A minimal HTTP/1.1 GET (no client crate needed for health and metrics).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token with `claims` plus `exp` one hour ahead unless given.
/// The resume token behind a wire id of a server keyed by [`SECRET`] (ids are sealed;
/// tests read them back as the operator could); `None` for anything else.
pub fn open_id(wire: &str) -> Option<String> {
    static CODEC: std::sync::OnceLock<changecast::idcodec::IdCodec> = std::sync::OnceLock::new();
    CODEC
        .get_or_init(|| changecast::idcodec::IdCodec::for_jwt_secret(SECRET.as_bytes()))
        .open(wire)
        .map(|id| id.as_str().to_owned())
}

/// [`open_id`], panicking on an id that does not open.
pub fn token_of(wire: &str) -> String {
    open_id(wire).unwrap_or_else(|| panic!("{wire:?} is not a sealed id of this deployment"))
}

pub fn token(mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn customer_token(id: &str) -> String {
    token(json!({"sub": id, "role": "customer"}))
}

pub fn store_token(sub: &str, stores: &[&str]) -> String {
    token(json!({"sub": sub, "role": "store", "stores": stores}))
}

pub fn admin_token() -> String {
    token(json!({"sub": "admin-1", "role": "admin"}))
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A native-protocol client.
pub struct Client {
    pub ws: Ws,
}

/// Why a connect failed: the HTTP status and body of the refusal.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

impl Client {
    /// Connects with `Authorization: Bearer`, and waits for `welcome`.
    pub async fn connect(server: &Server, token: &str) -> (Client, Value) {
        let mut c = Self::try_connect(server, Some(token), &[])
            .await
            .expect("connect");
        let welcome = c.next_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (c, welcome)
    }

    pub async fn try_connect(
        server: &Server,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Client, Refused> {
        Self::try_connect_url(&server.ws_url(), token, headers).await
    }

    pub async fn try_connect_url(
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Client, Refused> {
        let mut req = url.into_client_request().unwrap();
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(Refused {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        let _ = self.ws.send(m).await;
    }

    /// The next JSON text message (pings are answered by tungstenite), within 10 s.
    pub async fn next_json(&mut self) -> Value {
        self.next_json_within(Duration::from_secs(10))
            .await
            .expect("no message within 10s")
    }

    pub async fn next_json_within(&mut self, d: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match m {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(f)) => panic!("closed: {f:?}"),
                Ok(_) => continue,
                Err(e) => panic!("socket error: {e}"),
            }
        }
    }

    /// Every JSON message received within `d` (the whole window, however many arrive).
    pub async fn drain(&mut self, d: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + d;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_json_within(left).await {
                Some(v) => out.push(v),
                None => return out,
            }
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn closed_with(&mut self, d: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?
            {
                Some(Ok(Message::Close(Some(f)))) => return Some(f.code.into()),
                Some(Ok(Message::Close(None))) | None => return Some(1005),
                Some(Ok(_)) => continue,
                Some(Err(_)) => return Some(1006),
            }
        }
    }

    /// Collects `event` messages until `n` arrive or `d` passes.
    pub async fn events(&mut self, n: usize, d: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + d;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_json_within(left).await {
                Some(v) if v["type"] == "event" => out.push(v),
                Some(_) => {}
                None => break,
            }
        }
        out
    }

    pub async fn subscribe(&mut self, room: &str, since: Option<&str>) -> Value {
        let mut msg = json!({"type": "subscribe", "room": room});
        if let Some(s) = since {
            msg["since"] = json!(s);
        }
        self.send_json(msg).await;
        loop {
            let v = self.next_json().await;
            if v["type"] == "subscribed" || v["type"] == "error" {
                return v;
            }
        }
    }
}

/// A `changecast tail` child process and the file its stdout goes to.
pub struct Tail {
    pub child: std::process::Child,
    pub out: std::path::PathBuf,
}

/// Starts `changecast tail` writing to `out`, and waits until its stream is open (it says so on stderr).
pub fn start_tail(config: &std::path::Path, out: std::path::PathBuf) -> Tail {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let file = std::fs::File::create(&out).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["tail", "--config"])
        .arg(config)
        .env(SECRET_ENV, SECRET)
        .env("CHANGECAST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::from(file))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        // Until the stream opens: the lines, so that a failed start says why.
        let mut before = Some(String::new());
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(b) = &mut before {
                if line.contains("change stream open") {
                    let _ = tx.send(Ok(()));
                    before = None;
                } else {
                    b.push_str(&line);
                    b.push('\n');
                }
            }
        }
        if let Some(b) = before {
            let _ = tx.send(Err(b));
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(stderr)) => panic!("tail exited before opening its stream:\n{stderr}"),
        Err(e) => panic!("tail never opened its stream: {e}"),
    }
    Tail { child, out }
}

/// Sends `sig` (e.g. `"-TERM"`, `"-KILL"`) to a child process.
pub fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}
