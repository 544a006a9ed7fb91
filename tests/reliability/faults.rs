//! Database faults through mongo-sim: every resumable error code of the change-stream spec on
//! `getMore` (once and twice in a row), closed connections, non-resumable errors, a stopped and
//! restarted server, and lost history under both policies. Skipped against an external server
//! (fail points and oplog size are mongo-sim's).

use std::time::{Duration, Instant};

use bson::{doc, Document};

use crate::checker::check;
use crate::support::*;
use crate::world::*;

/// The change-streams spec's resumable codes (the `ResumableChangeStreamError` list for servers
/// that do not label errors themselves), CursorNotFound (43) included.
const RESUMABLE: [(i32, &str); 18] = [
    (6, "HostUnreachable"),
    (7, "HostNotFound"),
    (43, "CursorNotFound"),
    (63, "StaleShardVersion"),
    (89, "NetworkTimeout"),
    (91, "ShutdownInProgress"),
    (133, "FailedToSatisfyReadPreference"),
    (150, "StaleEpoch"),
    (189, "PrimarySteppedDown"),
    (234, "RetryChangeStream"),
    (262, "ExceededTimeLimit"),
    (9001, "SocketException"),
    (10107, "NotWritablePrimary"),
    (11600, "InterruptedAtShutdown"),
    (11602, "InterruptedDueToReplStateChange"),
    (13388, "StaleConfig"),
    (13435, "NotPrimaryNoSecondaryOk"),
    (13436, "NotPrimaryOrSecondary"),
];

/// Errors the spec says a change stream must not resume from by itself.
const NON_RESUMABLE: [(i32, &str); 3] = [
    (11601, "Interrupted"),
    (136, "CappedPositionLost"),
    (2, "BadValue"),
];

async fn fail_point(db: &Db, mode: bson::Bson, data: Document) {
    db.client
        .database("admin")
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": mode, "data": data})
        .await
        .unwrap();
}

/// Fails the worker's next `times` `getMore`s (only the worker's: the writer has another app name).
async fn fail_get_more(db: &Db, times: i32, what: Document) {
    let mut data = doc! {"failCommands": ["getMore"], "appName": "changecast"};
    data.extend(what);
    fail_point(db, doc! {"times": times}.into(), data).await;
}

fn skip(name: &str) -> bool {
    if external() {
        eprintln!("SKIP {name}: needs mongo-sim fail points and oplog size");
        return true;
    }
    false
}

async fn reconnects(server: &Server) -> f64 {
    metric(&metrics(server).await, "changecast_stream_reconnects_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_resumable_get_more_error_is_absorbed_without_loss_or_restart() {
    if skip("every_resumable_get_more_error_is_absorbed_without_loss_or_restart") {
        return;
    }
    let per = size("FAULT_CHANGES", 12, 100);
    let db = Db::start().await;
    let work = Workload::new(10, 4, 40);
    work.seed(&db).await;
    let server = Server::start(&db, "").await;
    let (admin, _) = Client::connect(&server, &admin_token()).await;
    let obs = Observer::spawn(admin);
    let mut seq = 0;
    let mut scenarios: Vec<(String, i32, Document)> = Vec::new();
    for (code, name) in RESUMABLE {
        for times in [1, 2] {
            scenarios.push((
                format!("{code} {name} ×{times}"),
                times,
                doc! {"errorCode": code},
            ));
        }
    }
    for times in [1, 2] {
        scenarios.push((
            format!("closed connection ×{times}"),
            times,
            doc! {"closeConnection": true},
        ));
    }
    let started = reconnects(&server).await;
    let mut failed = Vec::new();
    for (label, times, what) in &scenarios {
        fail_get_more(&db, *times, what.clone()).await;
        // Spread the writes so later ones need the getMores that fail.
        work.write_n(&db, seq, per, Some(200)).await;
        seq += per;
        let expected = work.ledger().total(|_| true);
        if !obs
            .wait(Duration::from_secs(15), |s| distinct(s) >= expected)
            .await
        {
            failed.push(label.clone());
        }
    }
    let restarts = reconnects(&server).await - started;
    let report = check(&work.ledger(), |_| true, &[obs.seen()]);
    figure(
        "faults.resumable",
        format!(
            "{} scenarios ({} codes ×1 and ×2, closed connection ×1 and ×2), {} changes: missing {} duplicated {} inversions {}; worker stream restarts {restarts}",
            scenarios.len(),
            RESUMABLE.len(),
            report.expected,
            report.missing,
            report.duplicated,
            report.inversions
        ),
    );
    assert!(failed.is_empty(), "never caught up after: {failed:?}");
    assert_eq!(
        report.missing + report.duplicated + report.inversions + report.cross_room,
        0,
        "{}",
        report.line()
    );
    assert_eq!(
        restarts, 0.0,
        "a resumable error restarted the worker's stream"
    );
    assert!(server.app().health.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_resumable_error_reconnects_from_the_checkpoint() {
    if skip("a_non_resumable_error_reconnects_from_the_checkpoint") {
        return;
    }
    let per = size("FAULT_CHANGES", 12, 100);
    let db = Db::start().await;
    let work = Workload::new(10, 4, 40);
    work.seed(&db).await;
    let server = Server::start(&db, "").await;
    let (admin, _) = Client::connect(&server, &admin_token()).await;
    let obs = Observer::spawn(admin);
    let mut seq = 0;
    let started = reconnects(&server).await;
    for (code, name) in NON_RESUMABLE {
        fail_get_more(&db, 1, doc! {"errorCode": code}).await;
        work.write_n(&db, seq, per, Some(200)).await;
        seq += per;
        let expected = work.ledger().total(|_| true);
        assert!(
            obs.wait(Duration::from_secs(20), |s| distinct(s) >= expected)
                .await,
            "never caught up after {code} {name}"
        );
    }
    let restarts = reconnects(&server).await - started;
    let report = check(&work.ledger(), |_| true, &[obs.seen()]);
    figure(
        "faults.non_resumable",
        format!(
            "{} codes ({}), {} changes: missing {} duplicated {}; worker stream reconnects {restarts}",
            NON_RESUMABLE.len(),
            NON_RESUMABLE.map(|(c, n)| format!("{c} {n}")).join(", "),
            report.expected,
            report.missing,
            report.duplicated
        ),
    );
    assert_eq!(
        report.missing + report.inversions + report.cross_room,
        0,
        "{}",
        report.line()
    );
    assert_eq!(report.duplicated, 0, "{}", report.line());
    assert!(
        restarts >= NON_RESUMABLE.len() as f64,
        "each non-resumable error must reconnect the stream: {restarts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_and_restarted_database_loses_nothing() {
    if skip("a_stopped_and_restarted_database_loses_nothing") {
        return;
    }
    let down = Duration::from_secs(size("DB_DOWN_SECS", 6, 30));
    let per = size("FAULT_CHANGES", 50, 500);
    let dir = tempfile::tempdir().unwrap();
    let db = Db::start_with(mongo_sim::SimConfig {
        data_file: Some(dir.path().join("sim.data")),
        ..Default::default()
    })
    .await;
    let work = Workload::new(10, 4, 40);
    work.seed(&db).await;
    let server = Server::start(&db, "").await;
    let (admin, _) = Client::connect(&server, &admin_token()).await;
    let obs = Observer::spawn(admin);
    work.write_n(&db, 0, per, Some(500)).await;
    let before = work.ledger().total(|_| true);
    assert!(
        obs.wait(Duration::from_secs(15), |s| distinct(s) >= before)
            .await
    );

    let sim = db.sim.as_ref().unwrap();
    let stopped = Instant::now();
    sim.stop().await;
    // /readyz turns false while the database is away.
    let mut unready_after = None;
    while stopped.elapsed() < down.max(Duration::from_secs(20)) {
        if server.get("/readyz").await.0 != 200 {
            unready_after = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(rest) = down.checked_sub(stopped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let downtime = stopped.elapsed();
    sim.restart().await.unwrap();
    let restarted = Instant::now();
    let mut ready_after = None;
    while restarted.elapsed() < Duration::from_secs(60) {
        if server.get("/readyz").await.0 == 200 {
            ready_after = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    work.write_n(&db, per, per, Some(500)).await;
    let expected = work.ledger().total(|_| true);
    let caught_up = obs
        .wait(Duration::from_secs(30), |s| distinct(s) >= expected)
        .await;
    let caught_up_after = restarted.elapsed();
    // Lag: now minus the newest token's cluster time; idle tokens advance every getMore.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let lag = metric(&metrics(&server).await, "changecast_stream_lag_seconds");
    let report = check(&work.ledger(), |_| true, &[obs.seen()]);
    figure(
        "faults.db_restart",
        format!(
            "down {:.1}s: /readyz false after {:?}, true {:?} after restart; {} changes: missing {} duplicated {}; caught up {:.1}s after restart; lag afterwards {lag:.1}s",
            downtime.as_secs_f64(),
            unready_after.map(|d| format!("{:.1}s", d.as_secs_f64())),
            ready_after.map(|d| format!("{:.1}s", d.as_secs_f64())),
            report.expected,
            report.missing,
            report.duplicated,
            caught_up_after.as_secs_f64()
        ),
    );
    assert!(
        unready_after.is_some(),
        "/readyz stayed true with the database down"
    );
    assert!(ready_after.is_some(), "/readyz never came back");
    assert!(caught_up, "{}", report.line());
    assert_eq!(
        report.missing + report.duplicated + report.inversions,
        0,
        "{}",
        report.line()
    );
    assert!(lag <= 3.0, "lag stayed at {lag}s");
}

/// Makes the worker's stream fall out of the oplog while it runs: its next `getMore` is held
/// back while more than an oplog's worth of changes is written.
async fn lose_history(db: &Db, work: &Workload, oplog: u64, first: u64) {
    fail_get_more(db, 1, doc! {"blockConnection": true, "blockTimeMS": 2_000}).await;
    // The getMore in flight returns on the first commit; the next one is held.
    work.write(db, first).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    work.write_n(db, first + 1, oplog * 2, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_history_applies_the_policy_every_run() {
    if skip("lost_history_applies_the_policy_every_run") {
        return;
    }
    let runs = size("HISTORY_LOST_RUNS", 2, 20);
    const OPLOG: u64 = 60;
    let mut fail_ok = 0;
    let mut resync_ok = 0;
    let mut worst = Duration::ZERO;
    for run in 0..runs {
        // fail: the worker stops with exit code 3 (the `tail` binary maps it).
        let db = Db::start_with(mongo_sim::SimConfig {
            oplog_size: OPLOG as usize,
            ..Default::default()
        })
        .await;
        let work = Workload::new(4, 2, 8);
        work.seed(&db).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!(
                "[mongodb]\nuri = \"{}\"\ndatabases = [\"{}\"]\n[checkpoint]\nstore = \"file\"\npath = \"{}\"\n[auth]\nsecret_env = \"{}\"\n",
                db.uri,
                db.name,
                dir.path().join("cp.json").display(),
                SECRET_ENV
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_changecast"))
            .args(["tail", "--on-history-lost", "fail", "--config"])
            .arg(&cfg)
            .env(SECRET_ENV, SECRET)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the stream is open: the checkpoint file appears with the start token.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.path().join("cp.json").exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lose_history(&db, &work, OPLOG, 0).await;
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
        match status {
            Ok(Ok(s)) if s.code() == Some(3) => fail_ok += 1,
            other => {
                let _ = child.kill().await;
                eprintln!("run {run}: fail policy gave {other:?}");
            }
        }

        // resync: every connected client is told within 5 s, and service goes on.
        let db = Db::start_with(mongo_sim::SimConfig {
            oplog_size: OPLOG as usize,
            ..Default::default()
        })
        .await;
        let work = Workload::new(4, 2, 8);
        work.seed(&db).await;
        let server = Server::start_in(
            &db,
            "",
            tempfile::tempdir().unwrap(),
            changecast::app::RunOptions {
                on_history_lost: changecast::pipeline::HistoryLostPolicy::Resync,
                ..Default::default()
            },
        )
        .await;
        let mut observers = Vec::new();
        for c in &work.customers {
            observers.push(Observer::spawn(
                Client::connect(&server, &customer_token(c)).await.0,
            ));
        }
        observers.push(Observer::spawn(
            Client::connect(&server, &admin_token()).await.0,
        ));
        lose_history(&db, &work, OPLOG, 0).await;
        let written = Instant::now();
        let mut all_told = true;
        for o in &observers {
            let told = o
                .wait(Duration::from_secs(10), |_| {
                    o.other
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|m| m["type"] == "resync")
                })
                .await;
            all_told &= told;
        }
        let took = written.elapsed();
        worst = worst.max(took);
        // Service continues after the resync.
        let before = observers.last().unwrap().seen().len();
        work.write(&db, 10_000).await;
        let live = observers
            .last()
            .unwrap()
            .wait(Duration::from_secs(10), |s| s.len() > before)
            .await;
        if all_told && took <= Duration::from_secs(5) && live {
            resync_ok += 1;
        } else {
            eprintln!("run {run}: resync told all {all_told} in {took:?}, live after {live}");
        }
    }
    figure(
        "faults.history_lost",
        format!(
            "fail policy: exit 3 in {fail_ok}/{runs} runs; resync policy: every client told within 5 s in {resync_ok}/{runs} runs (slowest {:.1}s after the last write)",
            worst.as_secs_f64()
        ),
    );
    assert_eq!(fail_ok, runs);
    assert_eq!(resync_ok, runs);
}
