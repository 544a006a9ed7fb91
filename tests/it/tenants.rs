//! Integration tests: with several watched databases, each token sees its own database's events and orders only.

use std::time::Duration;

use bson::doc;
use serde_json::json;

use crate::support::*;

/// changecast watching `a` and `b`; tokens name their database in the `db` claim.
async fn two_tenants() -> (Db, String, Server) {
    let db = Db::start().await;
    let b = format!("{}_b", db.name);
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var(SECRET_ENV, SECRET);
    let text = format!(
        "[mongodb]\nuri = \"{uri}\"\ndatabases = [\"{a}\", \"{b}\"]\nconnect_timeout = \"5s\"\n\
         [checkpoint]\nstore = \"file\"\npath = \"{cp}\"\ninterval = \"100ms\"\n\
         [auth]\nalgorithms = [\"HS256\"]\nsecret_env = \"{SECRET_ENV}\"\n",
        uri = db.uri,
        a = db.name,
        cp = dir.path().join("cp.json").display(),
    );
    let cfg = changecast::config::Config::from_toml_str(&text, "tenants.toml").unwrap();
    let handle = changecast::app::start(&cfg, Default::default(), listeners().await, None)
        .await
        .expect("start changecast");
    let server = Server::new(handle, dir);
    server.wait_ready().await;
    (db, b, server)
}

fn tenant_token(sub: &str, role: &str, db: &str) -> String {
    token(json!({"sub": sub, "role": role, "db": db}))
}

/// Waits until each tenant's observer has seen one more event (and nothing of the other's).
async fn published(a: &mut Client, b: &mut Client) {
    let got_a = a.events(1, Duration::from_secs(10)).await;
    let got_b = b.events(1, Duration::from_secs(10)).await;
    assert_eq!((got_a.len(), got_b.len()), (1, 1), "{got_a:?} {got_b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_ids_in_two_databases_never_cross_tenants() {
    let (db, b, server) = two_tenants().await;
    let a = db.name.clone();
    let orders_a = db.coll("orders");
    let orders_b = db
        .client
        .database(&b)
        .collection::<bson::Document>("orders");

    // A token that names no database, or one not watched, is refused: it could not be scoped.
    for bad in [
        customer_token("c1"),
        tenant_token("c1", "customer", "elsewhere"),
    ] {
        let r = Client::try_connect(&server, Some(&bad), &[]).await;
        assert!(r.is_err(), "an unscoped token was accepted");
    }

    let (mut c1_a, _) = Client::connect(&server, &tenant_token("c1", "customer", &a)).await;
    let (mut c1_b, _) = Client::connect(&server, &tenant_token("c1", "customer", &b)).await;
    // One observer per tenant: an admin token that names a database is scoped to it.
    let (mut admin_a, _) = Client::connect(&server, &tenant_token("root-a", "admin", &a)).await;
    let (mut admin_b, _) = Client::connect(&server, &tenant_token("root-b", "admin", &b)).await;
    // Same order id and same customer id in both tenants.
    orders_a
        .insert_one(doc! {"_id": "ord-1", "customerId": "c1", "storeId": "s1", "status": "new", "orderNumber": "A-1"})
        .await
        .unwrap();
    orders_b
        .insert_one(doc! {"_id": "ord-1", "customerId": "c1", "storeId": "s1", "status": "new", "orderNumber": "B-1"})
        .await
        .unwrap();
    published(&mut admin_a, &mut admin_b).await;
    for (c, mine, theirs) in [(&mut c1_a, "A-1", "B-1"), (&mut c1_b, "B-1", "A-1")] {
        let got = c.drain(Duration::from_millis(400)).await;
        let text = serde_json::to_string(&got).unwrap();
        assert!(text.contains(mine), "{got:?}");
        assert!(
            !text.contains(theirs),
            "another tenant's order arrived: {got:?}"
        );
    }

    // Order rooms: ownership is looked up in the token's own database.
    orders_a
        .insert_one(doc! {"_id": "ord-2", "customerId": "c2", "storeId": "s1", "status": "new", "orderNumber": "A-2"})
        .await
        .unwrap();
    orders_b
        .insert_one(doc! {"_id": "ord-2", "customerId": "c9", "storeId": "s9", "status": "new", "orderNumber": "B-2"})
        .await
        .unwrap();
    published(&mut admin_a, &mut admin_b).await;
    let (mut c2_b, _) = Client::connect(&server, &tenant_token("c2", "customer", &b)).await;
    let ack = c2_b.subscribe("order:ord-2", None).await;
    assert_eq!(
        ack["code"], "forbidden",
        "c2 of {b} joined an order that is c2's only in {a}: {ack}"
    );
    let (mut c2_a, _) = Client::connect(&server, &tenant_token("c2", "customer", &a)).await;
    assert_eq!(
        c2_a.subscribe("order:ord-2", None).await["type"],
        "subscribed"
    );
    orders_b
        .update_one(doc! {"_id": "ord-2"}, doc! {"$set": {"status": "accepted"}})
        .await
        .unwrap();
    orders_a
        .update_one(doc! {"_id": "ord-2"}, doc! {"$set": {"status": "packing"}})
        .await
        .unwrap();
    published(&mut admin_a, &mut admin_b).await;
    let got = c2_a.drain(Duration::from_millis(400)).await;
    let text = serde_json::to_string(&got).unwrap();
    assert!(
        !text.contains("B-2"),
        "the other tenant's order reached the order room: {got:?}"
    );
    assert!(text.contains("A-2"), "{got:?}");
}
