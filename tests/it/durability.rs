//! Durability of the resume token: `changecast tail` killed with SIGKILL while changes are written loses nothing.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use bson::doc;
use rand::Rng;

use crate::support::*;

const CHANGES: i64 = 5_000;
const ORDERS: i64 = 50;
const KILLS: usize = 5;

/// (order id, event id) of every admin delivery in a tail output, in output order.
///
/// Changes are identified by their event id (the resume token), not by document
/// contents: `updateLookup` returns the document as it is at lookup time, which
/// under fast writes is already a later version — on mongod as on mongo-sim.
fn read_outputs(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        // A SIGKILL can cut the last line short; that line's token was never checkpointed.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for d in v["deliveries"].as_array().unwrap() {
            if d["room"] == "admin" {
                let id = d["data"]["_id"].as_str().unwrap().to_owned();
                out.push((id, v["id"].as_str().unwrap().to_owned()));
            }
        }
    }
    out
}

/// The `_data` of the token in the checkpoint file: a run started now begins after it.
fn stored_token(path: &Path, db: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["streams"][db]["token"]["_data"]
        .as_str()
        .expect("no stored token")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_killed_five_times_loses_nothing_and_a_clean_stop_repeats_nothing() {
    let db = Db::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("changecast.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[mongodb]\nuri = \"{}\"\ndatabases = [\"{}\"]\n[checkpoint]\nstore = \"file\"\npath = \"{}\"\ninterval = \"200ms\"\nevery_events = 200\n[auth]\nsecret_env = \"{}\"\n",
            db.uri,
            db.name,
            dir.path().join("cp.json").display(),
            SECRET_ENV
        ),
    )
    .unwrap();
    let orders = db.coll("orders");
    let ids: Vec<bson::oid::ObjectId> = (0..ORDERS).map(|_| bson::oid::ObjectId::new()).collect();

    let mut runs = vec![start_tail(&cfg_path, dir.path().join("run0.jsonl"))];
    // Inserts are changes too: total = -1 marks them.
    for id in &ids {
        orders
            .insert_one(doc! {"_id": id, "customerId": "c1", "storeId": "s1", "status": "new", "total": -1i64})
            .await
            .unwrap();
    }
    let writer = {
        let orders = orders.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            for seq in 0..CHANGES {
                let id = ids[(seq % ORDERS) as usize];
                orders
                    .update_one(doc! {"_id": id}, doc! {"$set": {"total": seq}})
                    .await
                    .unwrap();
            }
        })
    };
    // Where the last run started (at least): read once it is open, so its start is saved.
    let mut last_start = String::new();
    for k in 1..=KILLS {
        let wait = rand::thread_rng().gen_range(200..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let last = runs.last_mut().unwrap();
        last.child.kill().unwrap(); // SIGKILL
        last.child.wait().unwrap();
        runs.push(start_tail(
            &cfg_path,
            dir.path().join(format!("run{k}.jsonl")),
        ));
        last_start = stored_token(&dir.path().join("cp.json"), &db.name);
    }
    writer.await.unwrap();
    // Let the last run catch up, then stop it cleanly. Caught up means more than "every change
    // was printed by some run": a killed run may have printed changes past its last checkpoint
    // that the last run has not delivered again yet, and a SIGTERM's final checkpoint covers
    // only what the last run printed, so the restart below would rightly deliver them again.
    // The last run prints in commit order from its start, so it has delivered everything it
    // owes once it has printed the newest change any run printed (if that is after its start).

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let expected = (ORDERS + CHANGES) as usize;
    let caught_up = |runs: &[Tail]| {
        let all: HashSet<String> = runs
            .iter()
            .flat_map(|r| read_outputs(&r.out))
            .map(|(_, id)| id)
            .collect();
        let newest = all.iter().max().cloned().unwrap_or_default();
        let owed_by_last = newest > last_start;
        all.len() >= expected
            && (!owed_by_last
                || read_outputs(&runs[runs.len() - 1].out)
                    .iter()
                    .any(|(_, id)| *id == newest))
    };
    while !caught_up(&runs) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "last run never caught up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = runs.last_mut().unwrap();
    signal(&last.child, "-TERM");
    let status = last.child.wait().unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");

    let mut all = Vec::new();
    for r in &runs {
        all.extend(read_outputs(&r.out));
    }
    // Every change to every document, counted by distinct event id per document.
    let mut per_doc: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for (doc, id) in &all {
        per_doc.entry(doc.clone()).or_default().insert(id.clone());
    }
    let writes_per_doc = 1 + CHANGES / ORDERS;
    for id in &ids {
        let seen = per_doc.get(&id.to_hex()).map_or(0, HashSet::len) as i64;
        assert_eq!(
            seen, writes_per_doc,
            "document {id}: {seen} of {writes_per_doc} changes seen"
        );
    }
    let duplicates = all.len() - expected;
    eprintln!("durability: {} changes, {KILLS} SIGKILLs, 0 lost, {duplicates} duplicates (bounded by the checkpoint window per kill)", expected);
    assert!(
        duplicates <= KILLS * 400,
        "duplicates {duplicates} exceed {KILLS} checkpoint windows"
    );
    // Per document, each run's output is in commit order.
    for r in &runs {
        let mut last: BTreeMap<String, String> = BTreeMap::new();
        for (doc, id) in read_outputs(&r.out) {
            if let Some(prev) = last.insert(doc.clone(), id.clone()) {
                assert!(id > prev, "order inversion for {doc}: {prev} then {id}");
            }
        }
    }

    // After a clean stop: a restart repeats nothing and continues with the next change.
    let mut again = start_tail(&cfg_path, dir.path().join("after-sigterm.jsonl"));
    for seq in CHANGES..CHANGES + 10 {
        orders
            .update_one(doc! {"_id": ids[0]}, doc! {"$set": {"total": seq}})
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while read_outputs(&again.out).len() < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "restart after SIGTERM saw too little"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(&again.child, "-TERM");
    assert!(again.child.wait().unwrap().success());
    let after = read_outputs(&again.out);
    let before: HashSet<String> = all.into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        after.len(),
        10,
        "0 duplicated, 0 lost after SIGTERM: {after:?}"
    );
    assert!(
        after.iter().all(|(_, id)| !before.contains(id)),
        "a change seen before the SIGTERM came again"
    );
}
