//! Integration tests: who may join which room, and an observer proving every delivery belongs to the receiving connection's rooms.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bson::{doc, oid::ObjectId};
use serde_json::{json, Value};

use crate::support::*;

/// Private settings fields: never in a storefront payload.
const PRIVATE_FIELDS: [&str; 6] = [
    "paymentProvider",
    "taxEnabled",
    "taxNexusCountries",
    "shippingPrice",
    "customDomain",
    "warehouse",
];

/// Collects every event until `quiet` passes with nothing new (or `max` elapses).
async fn drain(c: &mut Client, quiet: Duration, max: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + max;
    let mut out = Vec::new();
    while tokio::time::Instant::now() < deadline {
        match c.next_json_within(quiet).await {
            Some(v) if v["type"] == "event" => out.push(v),
            Some(v) => panic!("unexpected message {v}"),
            None => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rooms_answer_forbidden_and_deliver_nothing() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let (orders, payments, settings) =
        (db.coll("orders"), db.coll("payments"), db.coll("settings"));
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    let o1 = ObjectId::new();
    orders
        .insert_one(doc! {"_id": o1, "customerId": "c1", "storeId": "s1", "status": "new", "orderType": "pickup"})
        .await
        .unwrap();
    settings
        .insert_one(doc! {"storeId": "s1", "storeBanner": "b0", "taxEnabled": false, "paymentProvider": "stripe"})
        .await
        .unwrap();
    assert_eq!(admin.events(2, Duration::from_secs(10)).await.len(), 2);

    // c2 and the staff of s2 each try every room that is not theirs.
    let (mut c2, _) = Client::connect(&server, &customer_token("c2")).await;
    let (mut s2, _) = Client::connect(&server, &store_token("owner-2", &["s2"])).await;
    let order_room = format!("order:{o1}");
    for (who, c) in [("customer c2", &mut c2), ("store s2", &mut s2)] {
        for room in ["customer:c1", "store:s1", order_room.as_str(), "admin"] {
            let r = c.subscribe(room, None).await;
            assert_eq!(r["type"], "error", "{who} {room}: {r}");
            assert_eq!(r["code"], "forbidden", "{who} {room}: {r}");
            assert_eq!(r["room"], room, "{who}: {r}");
        }
        // A `since` does not open a door either.
        let r = c.subscribe("customer:c1", Some("00")).await;
        assert_eq!(r["code"], "forbidden", "{who}: {r}");
    }
    // An order that does not exist is refused the same way (no existence oracle).
    let ghost = c2
        .subscribe(&format!("order:{}", ObjectId::new()), None)
        .await;
    assert_eq!(ghost["code"], "forbidden", "{ghost}");

    // Storefronts are open to any authenticated client, but carry public sections only.
    let (mut shopper, _) = Client::connect(&server, &customer_token("c3")).await;
    let r = shopper.subscribe("storefront:s1", None).await;
    assert_eq!(r["type"], "subscribed", "{r}");

    // Writes that reach every refused room.
    orders
        .update_one(doc! {"_id": o1}, doc! {"$set": {"status": "accepted"}})
        .await
        .unwrap();
    payments
        .insert_one(doc! {"orderId": o1.to_hex(), "customerId": "c1", "storeId": "s1", "status": "pending", "amount": 10})
        .await
        .unwrap();
    settings
        .update_one(
            doc! {"storeId": "s1"},
            doc! {"$set": {"taxEnabled": true, "paymentProvider": "adyen"}},
        )
        .await
        .unwrap();
    settings
        .update_one(
            doc! {"storeId": "s1"},
            doc! {"$set": {"storeBanner": "b1", "shippingPrice": 7}},
        )
        .await
        .unwrap();
    // The admin sees all four, so they have passed through the hub.
    assert_eq!(admin.events(4, Duration::from_secs(10)).await.len(), 4);

    for (who, c) in [("customer c2", &mut c2), ("store s2", &mut s2)] {
        let got = drain(c, Duration::from_millis(500), Duration::from_secs(2)).await;
        assert!(got.is_empty(), "{who} received {got:?}");
    }
    // The shopper gets the public update only, and only its public fields.
    let got = drain(
        &mut shopper,
        Duration::from_millis(500),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["room"], "storefront:s1");
    assert_eq!(got[0]["data"]["storeBanner"], "b1");
    for f in PRIVATE_FIELDS {
        assert!(got[0]["data"].get(f).is_none(), "{f} leaked: {}", got[0]);
    }
    assert!(!got[0].to_string().contains("adyen"), "{}", got[0]);
    assert_eq!(got[0]["data"]["sections"], json!(["branding"]));
}

/// What a write was about, to know which rooms must receive its event.
#[derive(Clone)]
enum Subject {
    Order {
        customer: String,
        store: String,
        id: String,
    },
    Payment {
        customer: String,
        store: String,
        order: String,
    },
    Settings {
        store: String,
        public: bool,
    },
}

impl Subject {
    fn rooms(&self) -> BTreeSet<String> {
        let mut r = BTreeSet::from(["admin".to_owned()]);
        match self {
            Subject::Order {
                customer,
                store,
                id,
            } => {
                r.insert(format!("customer:{customer}"));
                r.insert(format!("store:{store}"));
                r.insert(format!("order:{id}"));
            }
            Subject::Payment {
                customer,
                store,
                order,
            } => {
                r.insert(format!("customer:{customer}"));
                r.insert(format!("store:{store}"));
                r.insert(format!("order:{order}"));
            }
            Subject::Settings { store, public } => {
                r.insert(format!("store:{store}"));
                if *public {
                    r.insert(format!("storefront:{store}"));
                }
            }
        }
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observer_every_delivery_belongs_to_the_receivers_rooms_and_none_is_missing() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let (orders, payments, settings) =
        (db.coll("orders"), db.coll("payments"), db.coll("settings"));
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;

    let customers = ["c1", "c2", "c3", "c4"];
    let stores = ["s1", "s2", "s3"];
    // Setup: one order per (customer, store) pair, one settings document per store.
    let mut order_owner: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (i, c) in customers.iter().enumerate() {
        for s in stores.iter().skip(i % 2) {
            let id = ObjectId::new();
            orders
                .insert_one(doc! {"_id": id, "customerId": *c, "storeId": *s, "status": "new", "orderType": "delivery"})
                .await
                .unwrap();
            order_owner.insert(id.to_hex(), (c.to_string(), s.to_string()));
        }
    }
    for s in stores {
        settings
            .insert_one(doc! {"storeId": s, "storeBanner": "b", "taxEnabled": false})
            .await
            .unwrap();
    }
    let setup = order_owner.len() + stores.len();
    assert_eq!(
        admin.events(setup, Duration::from_secs(10)).await.len(),
        setup
    );

    // Connections: every customer (plus one order room of theirs, and a storefront), every
    // store's staff (one with two stores), and a shopper on two storefronts.
    let mut clients: Vec<(String, Client, BTreeSet<String>)> = Vec::new();
    for (i, c) in customers.iter().enumerate() {
        let (mut cl, w) = Client::connect(&server, &customer_token(c)).await;
        let mut rooms: BTreeSet<String> = w["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        let mine = order_owner
            .iter()
            .find(|(_, (cust, _))| cust == c)
            .map(|(id, _)| id.clone())
            .unwrap();
        let room = format!("order:{mine}");
        assert_eq!(cl.subscribe(&room, None).await["type"], "subscribed");
        rooms.insert(room);
        let front = format!("storefront:{}", stores[i % stores.len()]);
        assert_eq!(cl.subscribe(&front, None).await["type"], "subscribed");
        rooms.insert(front);
        clients.push((format!("customer {c}"), cl, rooms));
    }
    for (sub, owned) in [("owner-1", vec!["s1"]), ("owner-23", vec!["s2", "s3"])] {
        let (cl, w) = Client::connect(&server, &store_token(sub, &owned)).await;
        let rooms: BTreeSet<String> = w["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(rooms, owned.iter().map(|s| format!("store:{s}")).collect());
        clients.push((format!("staff {sub}"), cl, rooms));
    }
    {
        let (mut cl, _) = Client::connect(&server, &customer_token("shopper")).await;
        let mut rooms = BTreeSet::from(["customer:shopper".to_owned()]);
        for s in ["s1", "s3"] {
            let room = format!("storefront:{s}");
            assert_eq!(cl.subscribe(&room, None).await["type"], "subscribed");
            rooms.insert(room);
        }
        clients.push(("shopper".into(), cl, rooms));
    }

    // The burst: status changes, new orders, payments, public and private settings updates.
    let mut writes = 0;
    let ids: Vec<(String, (String, String))> = order_owner
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for round in 0..3 {
        for (id, (c, s)) in &ids {
            let status = ["accepted", "ready", "out_for_delivery"][round];
            orders
                .update_one(
                    doc! {"_id": ObjectId::parse_str(id).unwrap()},
                    doc! {"$set": {"status": status}},
                )
                .await
                .unwrap();
            payments
                .insert_one(doc! {"orderId": id.as_str(), "customerId": c.as_str(), "storeId": s.as_str(), "status": "pending", "amount": round as i32})
                .await
                .unwrap();
            writes += 2;
        }
        for (i, s) in stores.iter().enumerate() {
            let set = if (round + i) % 2 == 0 {
                doc! {"storeBanner": format!("banner-{round}")}
            } else {
                doc! {"taxEnabled": round % 2 == 0, "paymentProvider": format!("p{round}")}
            };
            settings
                .update_one(doc! {"storeId": *s}, doc! {"$set": set})
                .await
                .unwrap();
            writes += 1;
        }
        let c = customers[round];
        let id = ObjectId::new();
        orders
            .insert_one(doc! {"_id": id, "customerId": c, "storeId": "s2", "status": "new"})
            .await
            .unwrap();
        writes += 1;
    }

    // Ground truth from the admin's view: which document each event id is about.
    let seen = admin.events(writes, Duration::from_secs(20)).await;
    assert_eq!(seen.len(), writes, "the admin observer missed events");
    let mut truth: BTreeMap<String, Subject> = BTreeMap::new();
    for e in &seen {
        let d = &e["data"];
        let name = e["event"].as_str().unwrap();
        let subject = if name.starts_with("order:") {
            let id = d["orderId"].as_str().unwrap().to_owned();
            let (customer, store) = order_owner.get(&id).cloned().unwrap_or_else(|| {
                (
                    d["customerId"].as_str().unwrap().to_owned(),
                    d["storeId"].as_str().unwrap().to_owned(),
                )
            });
            Subject::Order {
                customer,
                store,
                id,
            }
        } else if name.starts_with("payment:") {
            let order = d["orderId"].as_str().unwrap().to_owned();
            let (customer, store) = order_owner[&order].clone();
            Subject::Payment {
                customer,
                store,
                order,
            }
        } else {
            assert_eq!(name, "settings:updated", "{e}");
            let sections: Vec<&str> = d["sections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap())
                .collect();
            Subject::Settings {
                store: d["storeId"].as_str().unwrap().to_owned(),
                public: sections.contains(&"branding"),
            }
        };
        assert!(truth
            .insert(e["id"].as_str().unwrap().to_owned(), subject)
            .is_none());
    }

    let mut total = 0;
    for (who, c, rooms) in &mut clients {
        let got = drain(c, Duration::from_millis(700), Duration::from_secs(10)).await;
        let mut received = BTreeSet::new();
        for e in &got {
            let room = e["room"].as_str().unwrap().to_owned();
            assert!(
                rooms.contains(&room),
                "{who} got an event for {room}, not one of {rooms:?}"
            );
            let id = e["id"].as_str().unwrap().to_owned();
            let subject = truth
                .get(&id)
                .unwrap_or_else(|| panic!("{who} got an event the admin never saw: {e}"));
            assert!(
                subject.rooms().contains(&room),
                "{who} got {e} in {room}, which that change does not address"
            );
            if room.starts_with("storefront:") {
                for f in PRIVATE_FIELDS {
                    assert!(e["data"].get(f).is_none(), "{who}: {f} leaked: {e}");
                }
            }
            assert!(received.insert((id, room)), "{who} got a duplicate: {e}");
        }
        let expected: BTreeSet<(String, String)> = truth
            .iter()
            .flat_map(|(id, s)| {
                s.rooms()
                    .into_iter()
                    .filter(|r| rooms.contains(r))
                    .map(move |r| (id.clone(), r))
            })
            .collect();
        let missing: Vec<_> = expected.difference(&received).collect();
        assert!(missing.is_empty(), "{who} missed {missing:?}");
        assert!(
            !received.is_empty(),
            "{who} received nothing, so the test proved nothing"
        );
        total += received.len();
    }
    assert!(total > writes, "{total} deliveries for {writes} writes");
}
