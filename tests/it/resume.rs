//! Integration tests: the `changecast` binary's resume flags, history-lost policies, `tail` output, `check-config` and `token show`.

use std::io::{BufRead, BufReader};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::{doc, Bson, Document};
use futures::StreamExt;
use serde_json::Value;

use crate::support::*;

/// A `changecast` child process whose stdout goes to a file and whose stderr is kept.
pub(crate) struct Proc {
    pub child: Child,
    pub out: PathBuf,
    pub stderr: Arc<Mutex<String>>,
}

/// Writes a config file for `db` in `dir` (checkpoint in `dir/cp.json`) with `extra` TOML appended.
pub(crate) fn write_config(db: &Db, dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("changecast.toml");
    std::fs::write(
        &path,
        format!(
            "[mongodb]\nuri = \"{}\"\ndatabases = [\"{}\"]\nconnect_timeout = \"2s\"\n\
             [checkpoint]\nstore = \"file\"\npath = \"{}\"\ninterval = \"100ms\"\nevery_events = 1000\n\
             [auth]\nsecret_env = \"{}\"\n{extra}\n",
            db.uri,
            db.name,
            dir.join("cp.json").display(),
            SECRET_ENV
        ),
    )
    .unwrap();
    path
}

/// Starts `changecast <args>` with stdout in `out`; stderr is collected in the background.
pub(crate) fn spawn(args: &[&str], out: PathBuf) -> Proc {
    spawn_with(args, out, true)
}

/// [`spawn`], with the JWT secret in the environment or not.
pub(crate) fn spawn_with(args: &[&str], out: PathBuf, secret: bool) -> Proc {
    spawn_logging(args, out, secret, "info")
}

/// [`spawn_with`] at log filter `log` (`CHANGECAST_LOG`).
pub(crate) fn spawn_logging(args: &[&str], out: PathBuf, secret: bool, log: &str) -> Proc {
    let file = std::fs::File::create(&out).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_changecast"));
    if secret {
        cmd.env(SECRET_ENV, SECRET);
    } else {
        cmd.env_remove(SECRET_ENV)
            .env_remove("CHANGECAST_JWT_SECRET");
    }
    let mut child = cmd
        .args(args)
        .env("CHANGECAST_LOG", log)
        .env("NO_COLOR", "1")
        .env_remove("MONGODB_URI")
        .stdout(Stdio::from(file))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let pipe = child.stderr.take().unwrap();
    let sink = stderr.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    Proc { child, out, stderr }
}

impl Proc {
    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle` (the process logs readiness, no sleeps on a guess).
    pub(crate) async fn wait_stderr(&mut self, needle: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.stderr().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "changecast exited ({status}) before {needle:?}:\n{}",
                    self.stderr()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} within {within:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The complete JSON lines written so far.
    pub(crate) fn lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a line satisfies `pred`; returns every line up to and including it.
    pub(crate) async fn lines_until(
        &self,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let lines = self.lines();
            if let Some(i) = lines.iter().position(&pred) {
                return lines[..=i].to_vec();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected line never came; got {lines:#?}\nstderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit status (within `within`).
    pub(crate) async fn term(&mut self, within: Duration) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        self.wait_exit(within).await
    }

    pub(crate) async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "changecast did not exit within {within:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `changecast tail --config CFG <flags>` and waits until its stream is open.
pub(crate) async fn tail(cfg: &Path, flags: &[&str], out: PathBuf) -> Proc {
    let cfg = cfg.to_str().unwrap();
    let mut args = vec!["tail", "--config", cfg];
    args.extend_from_slice(flags);
    let mut p = spawn(&args, out);
    p.wait_stderr("change stream open", Duration::from_secs(20))
        .await;
    p
}

/// The order `_id`s of a tail's `order:*` lines, as written.
fn order_ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["event"].as_str().is_some_and(|e| e.starts_with("order:")))
        .map(|l| {
            l["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["room"] == "admin")
                .and_then(|d| d["data"]["_id"].as_str())
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// (event id, cluster time) of the next change a driver stream reports.
async fn next_change(
    cs: &mut mongodb::change_stream::ChangeStream<
        mongodb::change_stream::event::ChangeStreamEvent<Document>,
    >,
) -> (String, bson::Timestamp) {
    let ev = tokio::time::timeout(Duration::from_secs(10), cs.next())
        .await
        .expect("driver stream saw no change")
        .unwrap()
        .unwrap();
    let id = bson::to_document(&ev.id).unwrap();
    (
        id.get_str("_data").unwrap().to_owned(),
        ev.cluster_time.unwrap(),
    )
}

async fn insert_order(db: &Db, id: &str) {
    db.coll("orders")
        .insert_one(doc! {"_id": id, "customerId": "c1", "storeId": "s1", "status": "new"})
        .await
        .unwrap();
}

/// `--resume-token` (JSON and hex), `--start-at` (t:i and RFC 3339) and `--from-now`
/// each start exactly where they say, overriding the stored checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_flags_start_where_they_say() {
    let db = Db::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    // An independent witness of the ids and cluster times: the driver's own change stream.
    let mut witness = db.client.database(&db.name).watch().await.unwrap();

    insert_order(&db, "a").await;
    let (id_a, ts_a) = next_change(&mut witness).await;
    // B must be in a later wall-clock second than A, so a whole-second RFC 3339 start separates them.
    while now() <= u64::from(ts_a.time) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    insert_order(&db, "b").await;
    let (id_b, ts_b) = next_change(&mut witness).await;
    insert_order(&db, "c").await;
    let (id_c, _) = next_change(&mut witness).await;
    assert!(ts_b.time > ts_a.time);

    // Each run: the flags, then a marker written after the stream opened; the lines
    // before the marker are exactly where the run started.
    let mut marker = 0;
    let mut run = |flags: Vec<String>| {
        marker += 1;
        let (db, cfg, dir) = (&db, cfg.clone(), dir.path().to_owned());
        let m = format!("m{marker}");
        async move {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let mut p = tail(&cfg, &flags, dir.join(format!("{m}.jsonl"))).await;
            insert_order(db, &m).await;
            let lines = p
                .lines_until(Duration::from_secs(15), |l| {
                    order_ids(std::slice::from_ref(l)) == [m.clone()]
                })
                .await;
            assert!(p.term(Duration::from_secs(10)).await.success());
            let ids = order_ids(&lines);
            (ids[..ids.len() - 1].to_vec(), lines)
        }
    };

    // No checkpoint yet: from now, so none of a, b, c.
    let (seen, _) = run(vec![]).await;
    assert_eq!(seen, Vec::<String>::new(), "a first run starts from now");

    let json = format!("{{\"_data\":\"{id_a}\"}}");
    let (seen, lines) = run(vec!["--resume-token".into(), json]).await;
    assert_eq!(
        seen,
        ["b", "c", "m1"],
        "--resume-token JSON starts after a, despite the stored checkpoint"
    );
    assert_eq!(
        lines[0]["token"],
        id_b.as_str(),
        "lines carry their resume tokens"
    );
    assert_eq!(lines[1]["token"], id_c.as_str());

    let (seen, _) = run(vec!["--resume-token".into(), id_b.to_ascii_lowercase()]).await;
    assert_eq!(seen, ["c", "m1", "m2"], "--resume-token hex starts after b");

    let ti = format!("{}:{}", ts_b.time, ts_b.increment);
    let (seen, _) = run(vec!["--start-at".into(), ti]).await;
    assert_eq!(
        seen,
        ["b", "c", "m1", "m2", "m3"],
        "--start-at t:i includes b"
    );

    let rfc = time::OffsetDateTime::from_unix_timestamp(i64::from(ts_b.time))
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (seen, _) = run(vec!["--start-at".into(), rfc]).await;
    assert_eq!(
        seen,
        ["b", "c", "m1", "m2", "m3", "m4"],
        "--start-at RFC 3339 starts at b's second"
    );

    // Written while nothing runs: the stored checkpoint would replay it, --from-now must not.
    insert_order(&db, "missed").await;
    let (seen, _) = run(vec!["--from-now".into()]).await;
    assert_eq!(
        seen,
        Vec::<String>::new(),
        "--from-now ignores the stored token"
    );
    // And the stored checkpoint is now after m6: a plain run replays nothing.
    let (seen, _) = run(vec![]).await;
    assert_eq!(seen, Vec::<String>::new());

    // Malformed flags are usage errors (64) with a message, before any connection.
    for (flag, value) in [
        ("--resume-token", "not-a-token"),
        ("--start-at", "yesterday"),
    ] {
        let mut p = spawn(
            &["tail", "--config", cfg.to_str().unwrap(), flag, value],
            dir.path().join("bad.jsonl"),
        );
        let status = p.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(64), "{flag} {value}: {}", p.stderr());
    }
}

/// A resume token older than the oplog: `fail` exits 3 with the operator's choices;
/// `resync` sends `system:resync` and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_fails_clearly_or_resyncs() {
    if skip_unless_sim(
        "history_lost_fails_clearly_or_resyncs",
        "mongo-sim's tiny oplog (oplog_size = 20)",
    ) {
        return;
    }
    let db = Db::start_with(mongo_sim::SimConfig {
        oplog_size: 20,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &db,
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\n",
    );
    let mut witness = db.client.database(&db.name).watch().await.unwrap();
    insert_order(&db, "old").await;
    let (old, _) = next_change(&mut witness).await;
    drop(witness);
    for n in 0..50 {
        insert_order(&db, &format!("filler{n}")).await;
    }

    // The stored checkpoint is the old token: the default policy (fail).
    let checkpoint = serde_json::json!({"version": 1, "streams": {db.name.clone(): {
        "token": {"_data": old}, "lastEventId": old, "savedAt": "2026-01-01T00:00:00Z"}}});
    std::fs::write(dir.path().join("cp.json"), checkpoint.to_string()).unwrap();
    let mut p = spawn(
        &["tail", "--config", cfg.to_str().unwrap()],
        dir.path().join("fail.jsonl"),
    );
    let status = p.wait_exit(Duration::from_secs(20)).await;
    let err = p.stderr();
    assert_eq!(status.code(), Some(3), "{err}");
    for choice in [
        "no longer in the oplog",
        "--on-history-lost=resync",
        "--from-now",
        "--start-at",
    ] {
        assert!(err.contains(choice), "message lacks {choice:?}:\n{err}");
    }
    assert!(p.lines().is_empty());
    // The same through the flag.
    let mut p = spawn(
        &[
            "tail",
            "--config",
            cfg.to_str().unwrap(),
            "--resume-token",
            &old,
        ],
        dir.path().join("fail2.jsonl"),
    );
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await.code(), Some(3));
    // And the server, not only `tail`.
    let mut p = spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        dir.path().join("run.txt"),
    );
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(3), "{}", p.stderr());
    assert!(p.stderr().contains("--on-history-lost=resync"));

    // resync: one system:resync line, then live service from now.
    let mut p = tail(
        &cfg,
        &["--on-history-lost", "resync"],
        dir.path().join("resync.jsonl"),
    )
    .await;
    insert_order(&db, "after").await;
    let lines = p
        .lines_until(Duration::from_secs(15), |l| {
            order_ids(std::slice::from_ref(l)) == ["after"]
        })
        .await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(lines[0]["event"], "system:resync");
    assert_eq!(lines[0]["reason"], "history_lost");
    assert!(p.term(Duration::from_secs(10)).await.success());
    // The checkpoint moved on: a plain restart works without the flag.
    let mut p = tail(&cfg, &[], dir.path().join("again.jsonl")).await;
    insert_order(&db, "again").await;
    let lines = p
        .lines_until(Duration::from_secs(15), |l| {
            order_ids(std::slice::from_ref(l)) == ["again"]
        })
        .await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(p.term(Duration::from_secs(10)).await.success());
}

fn rooms(line: &Value) -> Vec<String> {
    let mut r: Vec<String> = line["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["room"].as_str().unwrap().to_owned())
        .collect();
    r.sort();
    r
}

fn delivery<'a>(line: &'a Value, room: &str) -> &'a Value {
    line["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["room"] == room)
        .map(|d| &d["data"])
        .unwrap_or_else(|| panic!("no delivery to {room} in {line}"))
}

/// Writes to the three collections give exactly the expected events in the expected rooms, in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_exactly_the_expected_events_in_commit_order() {
    let db = Db::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    let mut p = tail(&cfg, &[], dir.path().join("out.jsonl")).await;
    let (orders, payments, settings) =
        (db.coll("orders"), db.coll("payments"), db.coll("settings"));

    orders
        .insert_one(doc! {"_id": "o1", "customerId": "c1", "storeId": "s1", "status": "new", "orderType": "pickup", "notes": "ring twice"})
        .await
        .unwrap();
    payments
        .insert_one(doc! {"_id": "p1", "orderId": "o1", "customerId": "c1", "storeId": "s1", "amount": 10, "status": "processing", "cardToken": "tok_x"})
        .await
        .unwrap();
    orders
        .update_one(doc! {"_id": "o1"}, doc! {"$set": {"status": "ready"}})
        .await
        .unwrap();
    payments
        .update_one(doc! {"_id": "p1"}, doc! {"$set": {"status": "paid"}})
        .await
        .unwrap();
    settings
        .insert_one(
            doc! {"_id": "st1", "storeId": "s1", "storeBanner": "b.png", "taxEnabled": true},
        )
        .await
        .unwrap();
    settings
        .update_one(doc! {"_id": "st1"}, doc! {"$set": {"taxEnabled": false}})
        .await
        .unwrap();
    settings
        .update_one(doc! {"_id": "st1"}, doc! {"$set": {"storeLogo": "l.png"}})
        .await
        .unwrap();
    // An update no audience may see: `internal` is in no allowlist.
    orders
        .update_one(doc! {"_id": "o1"}, doc! {"$set": {"internal": 1}})
        .await
        .unwrap();
    // A collection nobody watches.
    db.coll("users")
        .insert_one(doc! {"_id": "u1", "customerId": "c1"})
        .await
        .unwrap();
    orders.delete_one(doc! {"_id": "o1"}).await.unwrap();
    orders
        .insert_one(doc! {"_id": "end", "customerId": "c2", "storeId": "s2", "status": "new"})
        .await
        .unwrap();

    let lines = p
        .lines_until(Duration::from_secs(15), |l| {
            l["event"] == "order:created" && delivery(l, "admin")["_id"] == "end"
        })
        .await;
    assert!(p.term(Duration::from_secs(10)).await.success());
    let got: Vec<(String, Vec<String>)> = lines
        .iter()
        .map(|l| (l["event"].as_str().unwrap().to_owned(), rooms(l)))
        .collect();
    let want = |e: &str, r: &[&str]| (e.to_owned(), r.iter().map(|s| s.to_string()).collect());
    let record = ["admin", "customer:c1", "order:o1", "store:s1"];
    assert_eq!(
        got,
        [
            want("order:created", &record),
            want("payment:created", &record),
            want("order:status_changed", &record),
            want("payment:status_changed", &record),
            want("settings:updated", &["admin", "store:s1", "storefront:s1"]),
            want("settings:updated", &["admin", "store:s1"]),
            want("settings:updated", &["admin", "store:s1", "storefront:s1"]),
            want("order:deleted", &record),
            want(
                "order:created",
                &["admin", "customer:c2", "order:end", "store:s2"]
            ),
        ]
    );
    // Commit order: ids strictly increase.
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // Content of a few deliveries.
    let ready = &lines[2];
    assert_eq!(delivery(ready, "customer:c1")["status"], "ready_for_pickup");
    assert_eq!(delivery(ready, "customer:c1")["previousStatus"], "pending");
    assert_eq!(delivery(ready, "store:s1")["rawStatus"], "ready");
    assert_eq!(delivery(&lines[3], "customer:c1")["status"], "succeeded");
    assert!(delivery(&lines[0], "customer:c1").get("notes").is_none());
    assert_eq!(delivery(&lines[0], "store:s1")["notes"], "ring twice");
    assert!(
        !lines.iter().any(|l| l.to_string().contains("tok_x")),
        "a field in no allowlist leaked"
    );
    let private = &lines[5];
    assert_eq!(delivery(private, "store:s1")["taxEnabled"], false);
    let public = delivery(&lines[6], "storefront:s1");
    assert_eq!(public["storeLogo"], "l.png");
    assert!(public.get("taxEnabled").is_none(), "{public}");
}

/// `check-config`: 0 and the effective config with secrets masked; 64 and the key and position on errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_masks_secrets_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[mongodb]\nuri = \"mongodb://reader:hunter2pw@db.example:27017/?replicaSet=rs0\"\n\
             [auth]\nsecret_env = \"{SECRET_ENV}\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["check-config", "--config", good.to_str().unwrap()])
        .env(SECRET_ENV, SECRET)
        .env_remove("MONGODB_URI")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("db.example"), "{stdout}");
    assert!(
        stdout.contains("history_len"),
        "defaults are shown: {stdout}"
    );
    for secret in ["hunter2pw", SECRET] {
        assert!(!stdout.contains(secret), "secret printed: {stdout}");
    }
    // MONGODB_URI overrides the file, and is masked too.
    let out = Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["check-config", "--config", good.to_str().unwrap()])
        .env("MONGODB_URI", "mongodb://u:envpass99@envhost/")
        .env(SECRET_ENV, SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("envhost") && !stdout.contains("envpass99"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[mongodb]\ndatabases = [\"app\"]\n\n[hub]\nhistory_len = 10\nhistroy_age = \"5m\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("histroy_age") && stderr.contains("6:"),
        "names the key and its line: {stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["check-config", "--config", "/nonexistent/changecast.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// `token show` prints the stored token and the cluster time it encodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_show_prints_the_stored_token_and_its_time() {
    let db = Db::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    let show = || {
        let out = Command::new(env!("CARGO_BIN_EXE_changecast"))
            .args(["token", "show", "--config", cfg.to_str().unwrap()])
            .env_remove("MONGODB_URI")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(show().contains("none stored"), "{}", show());

    let mut p = tail(&cfg, &[], dir.path().join("out.jsonl")).await;
    insert_order(&db, "t1").await;
    let lines = p
        .lines_until(Duration::from_secs(15), |l| {
            order_ids(std::slice::from_ref(l)) == ["t1"]
        })
        .await;
    assert!(p.term(Duration::from_secs(10)).await.success());
    let last_id = lines[0]["id"].as_str().unwrap();

    let stored: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cp.json")).unwrap())
            .unwrap();
    let entry = &stored["streams"][&db.name];
    let token = entry["token"]["_data"].as_str().unwrap();
    assert_eq!(entry["lastEventId"], last_id);
    let text = show();
    assert!(text.contains(&db.name), "{text}");
    assert!(text.contains(token), "{text}");
    assert!(
        text.contains(&format!("last event id: {last_id}")),
        "{text}"
    );
    // The cluster time in both forms, of the stream position saved with the token (on
    // every server; MongoDB's tokens also carry it, SecantusDB's do not say).
    let position = entry["position"].as_str().unwrap();
    assert!(
        text.contains(&format!("position:      {position}")),
        "{text}"
    );
    let at = changecast::sequence::position(&changecast::event::EventId::new(position))
        .unwrap()
        .timestamp();
    let (secs, inc) = (at.time, at.increment);
    let rfc = time::OffsetDateTime::from_unix_timestamp(i64::from(secs))
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(text.contains(&format!("{rfc} ({secs}:{inc})")), "{text}");
    assert!(
        (i64::from(secs) - now() as i64).abs() < 120,
        "cluster time is about now"
    );
}

// ---- bad input through the real driver ------------------------------------

/// Ids in the hostile corpus: clean ones that make rooms, and values that must never make one.
fn hostile_id(rng: &mut impl rand::Rng, clean: &[&str]) -> Option<Bson> {
    Some(match rng.gen_range(0..16) {
        0..=5 => Bson::String(clean[rng.gen_range(0..clean.len())].into()),
        6 => return None,
        7 => Bson::Null,
        8 => Bson::Int32(rng.gen()),
        9 => Bson::Int64(rng.gen()),
        10 => Bson::Double(rng.gen()),
        11 => Bson::Array(vec![Bson::String(clean[0].into())]),
        12 => Bson::Document(doc! {"id": clean[0]}),
        13 => Bson::String(["", "../x", "a b", "ü", "*", "c1:admin"][rng.gen_range(0..6)].into()),
        14 => Bson::String("x".repeat(rng.gen_range(129..5000))),
        _ => Bson::Boolean(rng.gen()),
    })
}

/// The BSON dates SecantusDB stores: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z, in ms.
const SECANTUS_DATES: RangeInclusive<i64> = -62_135_596_800_000..=253_402_300_799_999;

fn hostile_value(rng: &mut impl rand::Rng, depth: u32, dates: &RangeInclusive<i64>) -> Bson {
    match rng.gen_range(0..14) {
        0 => Bson::Null,
        1 => Bson::Double([f64::NAN, f64::INFINITY, -0.0, f64::MAX, 1e-300][rng.gen_range(0..5)]),
        2 => Bson::Int64(i64::MIN),
        // Mostly short, sometimes huge: size matters for the parser, not the count.
        3 => Bson::String("y".repeat(if rng.gen_bool(0.05) {
            rng.gen_range(20_000..200_000)
        } else {
            rng.gen_range(0..200)
        })),
        4 => Bson::Binary(bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: vec![0xFF; rng.gen_range(0..1000)],
        }),
        5 => Bson::Decimal128(bson::Decimal128::from_bytes(rng.gen())),
        6 => Bson::RegularExpression(bson::Regex {
            pattern: "(a+)+$".into(),
            options: "i".into(),
        }),
        7 => Bson::JavaScriptCode("while(1){}".into()),
        8 => Bson::DateTime(bson::DateTime::from_millis(rng.gen_range(dates.clone()))),
        9 => Bson::Timestamp(bson::Timestamp {
            time: rng.gen(),
            increment: rng.gen(),
        }),
        10 => Bson::MinKey,
        11 if depth < 60 => Bson::Document(doc! {"d": hostile_value(rng, depth + 1, dates)}),
        12 if depth < 60 => Bson::Array(vec![hostile_value(rng, depth + 1, dates); 3]),
        _ => Bson::String("\u{0}\u{202e}\u{1F600}".into()),
    }
}

/// The last `max` bytes of a file (from the next line start), lossily decoded.
fn tail_of(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    match text.find('\n') {
        Some(i) if len > max => text[i + 1..].to_owned(),
        _ => text,
    }
}

/// What a delivery's room must be for a document, by this test's reading of the rules
/// (first present non-null path; a string, ObjectId or integer id of 1–128 `[A-Za-z0-9_.-]`).
fn expected_room_id(doc: &Document, paths: &[&str]) -> Option<String> {
    let v = paths
        .iter()
        .find_map(|p| doc.get(*p).filter(|v| !matches!(v, Bson::Null)))?;
    let id = match v {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(o) => o.to_hex(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        _ => return None,
    };
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    ok.then_some(id)
}

/// 10,000 hostile documents written through the driver: `tail` keeps running, routes
/// every delivery to exactly the room its document names (or none), leaks nothing
/// outside the allowlists, and its checkpoint keeps advancing through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_never_misroute_and_the_checkpoint_advances() {
    use rand::{Rng, SeedableRng};
    let n: usize = std::env::var("CHANGECAST_HOSTILE_DOCS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let db = Db::start().await;
    // Any 64-bit millisecond count is a BSON date MongoDB stores; SecantusDB refuses those
    // outside years 1-9999, so there the hostile dates stay inside them.
    let dates = if backend().await == Backend::Secantus {
        skip(
            "hostile_documents_never_misroute_and_the_checkpoint_advances (its dates outside years 1-9999)",
            "SecantusDB refuses to store a BSON date outside 0001-01-01..9999-12-31 \
             (BadValue \"year 10000 is out of range\"); MongoDB stores any 64-bit millisecond count",
        );
        SECANTUS_DATES
    } else {
        i64::MIN..=i64::MAX
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    let mut p = tail(&cfg, &[], dir.path().join("out.jsonl")).await;
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("hostile documents: seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let clean = ["c1", "c2", "s1", "s2", "o-1", "65f0a1b2c3d4e5f601234567"];
    let colls = ["orders", "payments", "settings"];
    let statuses = ["new", "ready", "paid", "completed", "bogus", "READY", ""];

    let mut docs: std::collections::HashMap<String, (usize, Document)> = Default::default();
    let mut batches: [Vec<Document>; 3] = Default::default();
    for i in 0..n {
        let c = rng.gen_range(0..3);
        let mut d = doc! {"_id": format!("h{i}")};
        for key in ["customerId", "storeId", "sellerId", "orderId"] {
            if let Some(v) = hostile_id(&mut rng, &clean) {
                d.insert(key, v);
            }
        }
        match rng.gen_range(0..4) {
            0 => {}
            1 => {
                d.insert("status", hostile_value(&mut rng, 0, &dates));
            }
            _ => {
                d.insert("status", statuses[rng.gen_range(0..statuses.len())]);
            }
        }
        for key in [
            "secretKey",
            "orderType",
            "items",
            "storeLogo",
            "paymentProvider",
            "warehouse",
            "total",
        ] {
            if rng.gen_bool(0.3) {
                d.insert(key, hostile_value(&mut rng, 0, &dates));
            }
        }
        docs.insert(format!("h{i}"), (c, d.clone()));
        batches[c].push(d);
    }
    // Inserts in batches (with updates and deletes of some of them), then a sentinel.
    let t0 = std::time::Instant::now();
    let mut written = 0;
    for (c, batch) in batches.iter().enumerate() {
        for chunk in batch.chunks(500) {
            db.coll(colls[c]).insert_many(chunk.to_vec()).await.unwrap();
            written += chunk.len();
        }
    }
    assert_eq!(written, n);
    let mut updated = std::collections::HashSet::new();
    for i in (0..n).step_by(50) {
        let id = format!("h{i}");
        let (c, _) = docs[&id];
        let v = hostile_value(&mut rng, 0, &dates);
        db.coll(colls[c])
            .update_one(
                doc! {"_id": &id},
                doc! {"$set": {"notes": v, "status": "accepted"}},
            )
            .await
            .unwrap();
        docs.get_mut(&id).unwrap().1.insert("status", "accepted");
        updated.insert(id);
    }
    for i in (25..n).step_by(100) {
        let id = format!("h{i}");
        let (c, _) = docs[&id];
        db.coll(colls[c])
            .delete_one(doc! {"_id": &id})
            .await
            .unwrap();
    }
    insert_order(&db, "sentinel").await;
    eprintln!("hostile documents: written in {:?}", t0.elapsed());

    // The checkpoint keeps advancing while the documents go through.
    let cp_path = dir.path().join("cp.json");
    // The stream position saved with the token: ordered like event ids on any server
    // (tokens themselves need not sort).
    let stored_token = || -> Option<String> {
        let text = std::fs::read_to_string(&cp_path).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["streams"][&db.name]["position"]
            .as_str()
            .map(str::to_owned)
    };
    let mut tokens = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let sentinel_id = loop {
        if let Some(t) = stored_token() {
            if tokens.last() != Some(&t) {
                tokens.push(t);
            }
        }
        // Only the end of the output is read while waiting: parsing all of it every
        // time would compete with the process under test for the CPU.
        let end = tail_of(&p.out, 256 * 1024);
        if let Some(l) = end
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| order_ids(std::slice::from_ref(l)) == ["sentinel"])
        {
            break l["id"].as_str().unwrap().to_owned();
        }
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "tail died: {}",
            p.stderr()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "sentinel never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "hostile documents: all through tail after {:?}",
        t0.elapsed()
    );
    assert!(!p.stderr().contains("panicked"), "{}", p.stderr());
    assert!(p.term(Duration::from_secs(10)).await.success());
    let last = stored_token().unwrap();
    assert!(
        last >= sentinel_id,
        "final checkpoint {last} < {sentinel_id}"
    );
    // The final save may be the token already seen while waiting (saves run beside the stream).
    if tokens.last() != Some(&last) {
        tokens.push(last);
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "checkpoint went back"
    );
    assert!(
        tokens.len() >= 3,
        "checkpoint advanced only {} times",
        tokens.len()
    );

    // Every delivery goes to the room its document names, and only allowlisted fields leave.
    let lines = p.lines();
    let (mut deliveries, mut events) = (0, 0);
    let forbidden = ["secretKey", "paymentProvider\":\"", "sellerId"];
    for l in &lines {
        let event = l["event"].as_str().unwrap();
        let admin = l["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["room"] == "admin");
        let id = match admin.and_then(|a| a["data"]["_id"].as_str()) {
            Some(id) => id.to_owned(),
            // Settings payloads carry no _id; identify them by what they say below.
            None => continue,
        };
        if id == "sentinel" {
            continue;
        }
        let (c, d) = &docs[&id];
        events += 1;
        assert!(
            event.starts_with(&colls[*c][..colls[*c].len() - 1]),
            "{event} for a {} document",
            colls[*c]
        );
        for dl in l["deliveries"].as_array().unwrap() {
            deliveries += 1;
            let room = dl["room"].as_str().unwrap();
            let text = dl["data"].to_string();
            for f in forbidden {
                assert!(!text.contains(f), "{f} leaked to {room}: {text}");
            }
            let Some((kind, rid)) = room.split_once(':') else {
                assert_eq!(room, "admin");
                continue;
            };
            let want = match (colls[*c], kind) {
                (_, "customer") => expected_room_id(d, &["customerId"]),
                (_, "store") => expected_room_id(d, &["storeId", "sellerId"]),
                ("orders", "order") => Some(id.clone()),
                ("payments", "order") => expected_room_id(d, &["orderId"]),
                (coll, k) => panic!("{k} room for a {coll} document"),
            };
            assert_eq!(
                Some(rid),
                want.as_deref(),
                "mis-routed {event} of {id}: {d}"
            );
        }
    }
    // Settings lines: their store rooms must be a clean id some settings document named.
    let settings_stores: std::collections::HashSet<String> = docs
        .values()
        .filter(|(c, _)| *c == 2)
        .filter_map(|(_, d)| expected_room_id(d, &["storeId", "sellerId"]))
        .collect();
    for l in lines.iter().filter(|l| l["event"] == "settings:updated") {
        for dl in l["deliveries"].as_array().unwrap() {
            let room = dl["room"].as_str().unwrap();
            if let Some((_, rid)) = room.split_once(':') {
                assert!(settings_stores.contains(rid), "guessed room {room}");
            }
            assert!(!dl["data"].to_string().contains("secretKey"));
        }
        if let Some(sf) = l["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["room"].as_str().unwrap().starts_with("storefront:"))
        {
            let t = sf["data"].to_string();
            assert!(
                !t.contains("paymentProvider") && !t.contains("warehouse"),
                "{t}"
            );
        }
    }
    eprintln!(
        "hostile documents: {n} written (+{} updates, {} deletes), {} lines, {events} record events, {deliveries} deliveries checked, 0 mis-routed, checkpoint advanced {} times",
        updated.len(),
        (25..n).step_by(100).count(),
        lines.len(),
        tokens.len()
    );
    assert!(
        events > n / 4,
        "too few events routed to check anything: {events}"
    );
}

/// A resume token the server never issued is refused for good: exit 1 with the way out, not a reconnect loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_server_rejects_stops_with_a_clear_message() {
    let db = Db::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    let mut p = spawn(
        &[
            "tail",
            "--config",
            cfg.to_str().unwrap(),
            "--resume-token",
            "8200",
        ],
        dir.path().join("out.jsonl"),
    );
    let status = p.wait_exit(Duration::from_secs(15)).await;
    let err = p.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    // The server's own name for the refusal: mongo-sim says InvalidResumeToken (260), as
    // mongod does for a token of another cluster; SecantusDB says FailedToParse (9), as mongod
    // does for a token that is not hex; mongod's KeyString decoder says 50811.
    let named = match backend().await {
        Backend::MongoSim => &["InvalidResumeToken"][..],
        Backend::Secantus => &["FailedToParse"][..],
        Backend::MongoDb => &["InvalidResumeToken", "FailedToParse", "50811"][..],
    };
    assert!(named.iter().any(|n| err.contains(n)), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert!(err.contains("--from-now"), "{err}");
    assert!(
        !err.contains("RawDocumentBuf"),
        "raw server reply in the message: {err}"
    );
}

/// A corrupt checkpoint file stops a plain start with a message naming it; `--from-now`
/// ignores it, runs, and replaces it with a valid checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_is_named_and_from_now_gets_past_it() {
    let db = Db::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    let cp = dir.path().join("cp.json");
    std::fs::write(&cp, b"{\"version\": 1, \"streams\": {tru").unwrap();
    let mut p = spawn(
        &["tail", "--config", cfg.to_str().unwrap()],
        dir.path().join("out.jsonl"),
    );
    let status = p.wait_exit(Duration::from_secs(15)).await;
    let err = p.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("cp.json") && err.contains("--from-now"),
        "{err}"
    );

    let mut p = tail(&cfg, &["--from-now"], dir.path().join("out2.jsonl")).await;
    insert_order(&db, "x").await;
    p.lines_until(Duration::from_secs(15), |l| {
        order_ids(std::slice::from_ref(l)) == ["x"]
    })
    .await;
    assert!(p.term(Duration::from_secs(10)).await.success());
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    assert!(
        saved["streams"][&db.name]["token"]["_data"].is_string(),
        "{saved}"
    );
}

/// With pre-images enabled on the collection, a delete is routed to its owners even by a
/// process that never saw the document (here: started after it was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_images_route_deletes_of_documents_this_process_never_saw() {
    let db = Db::start().await;
    db.client
        .database(&db.name)
        .run_command(doc! {"create": "orders", "changeStreamPreAndPostImages": {"enabled": true}})
        .await
        .unwrap();
    insert_order(&db, "old").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    let mut p = tail(&cfg, &[], dir.path().join("out.jsonl")).await;
    db.coll("orders")
        .delete_one(doc! {"_id": "old"})
        .await
        .unwrap();
    insert_order(&db, "marker").await;
    let lines = p
        .lines_until(Duration::from_secs(15), |l| {
            order_ids(std::slice::from_ref(l)) == ["marker"]
        })
        .await;
    assert!(p.term(Duration::from_secs(10)).await.success());
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(lines[0]["event"], "order:deleted");
    assert_eq!(
        rooms(&lines[0]),
        ["admin", "customer:c1", "order:old", "store:s1"]
    );
}

/// `tail` serves no sockets, so it verifies no token: it starts without the JWT secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_starts_without_the_jwt_secret() {
    let db = Db::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    let mut p = spawn_with(
        &["tail", "--config", cfg.to_str().unwrap()],
        dir.path().join("tail.jsonl"),
        false,
    );
    p.wait_stderr("change stream open", Duration::from_secs(20))
        .await;
    insert_order(&db, "no-secret").await;
    let lines = p.lines_until(Duration::from_secs(15), |_| true).await;
    assert_eq!(lines.len(), 1, "{}", p.stderr());
    assert!(p.term(Duration::from_secs(10)).await.success());
}
