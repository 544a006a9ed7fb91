//! Model-based rights test: actors connect, subscribe, unsubscribe, refresh tokens (some with
//! fewer stores), let tokens expire and reconnect, while orders, payments, settings and a
//! declared stream's deliveries of 50 customers and 20 stores change; every delivery is checked
//! against the connection's joined rooms, the model's rights for its current token, and the
//! document's owners.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::checker::Seen;
use crate::support::*;
use crate::world::*;

#[derive(Debug, Clone)]
struct Ident {
    sub: String,
    admin: bool,
    customer: bool,
    stores: Vec<String>,
}

impl Ident {
    fn token(&self, exp: u64) -> String {
        if self.admin {
            token(json!({"sub": self.sub, "role": "admin", "exp": exp}))
        } else if self.customer {
            token(json!({"sub": self.sub, "role": "customer", "exp": exp}))
        } else {
            token(json!({"sub": self.sub, "role": "store", "stores": self.stores, "exp": exp}))
        }
    }
}

/// The rights model (design.md's rooms table), independent of the product's authz code.
fn may(id: &Ident, room: &str, work: &Workload) -> bool {
    if id.admin {
        return true;
    }
    let Some((kind, rid)) = room.split_once(':') else {
        return false;
    };
    match kind {
        // Anyone may follow their own purchases, staff included.
        "customer" => rid == id.sub,
        "store" => id.stores.iter().any(|s| s == rid),
        "storefront" => true,
        "order" => work.orders.iter().any(|o| {
            o.id.to_hex() == rid && (o.customer == id.sub || id.stores.contains(&o.store))
        }),
        _ => false,
    }
}

#[derive(Debug, Default, Clone)]
struct Tally {
    deliveries: u64,
    /// Of which from the declared stream.
    declared: u64,
    /// Of which its status changes.
    declared_status: u64,
    outside_rooms: u64,
    outside_rights: u64,
    cross_room: u64,
    wrongly_granted: u64,
    refused_by_server_allowed_by_model: u64,
    after_expiry: u64,
    subscribes: u64,
    refreshes: u64,
    reduced_refreshes: u64,
    connects: u64,
    expiries: u64,
    examples: Vec<String>,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.deliveries += o.deliveries;
        self.declared += o.declared;
        self.declared_status += o.declared_status;
        self.outside_rooms += o.outside_rooms;
        self.outside_rights += o.outside_rights;
        self.cross_room += o.cross_room;
        self.wrongly_granted += o.wrongly_granted;
        self.refused_by_server_allowed_by_model += o.refused_by_server_allowed_by_model;
        self.after_expiry += o.after_expiry;
        self.subscribes += o.subscribes;
        self.refreshes += o.refreshes;
        self.reduced_refreshes += o.reduced_refreshes;
        self.connects += o.connects;
        self.expiries += o.expiries;
        if self.examples.len() < 5 {
            self.examples.extend(o.examples.iter().take(5).cloned());
        }
    }
}

/// One connection's view: its identity now, its joined rooms, when its token expires.
struct Conn {
    c: Client,
    id: Ident,
    joined: BTreeSet<String>,
    expires: Instant,
}

const LEEWAY: Duration = Duration::from_secs(1);

async fn actor(
    url: String,
    work: Workload,
    mut id: Ident,
    seed: u64,
    until: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = Tally::default();
    let mut conn: Option<Conn> = None;
    let full_stores = id.stores.clone();
    while Instant::now() < until {
        let Some(cn) = conn.as_mut() else {
            id.stores = full_stores.clone();
            let short = rng.gen_bool(0.2);
            let life = if short { rng.gen_range(2..5) } else { 3600 };
            let tok = id.token(now() + life);
            let Ok(mut c) = Client::try_connect_url(&url, Some(&tok), &[]).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(w) = c.next_json_within(Duration::from_secs(10)).await else {
                continue;
            };
            t.connects += 1;
            let joined: BTreeSet<String> = w["rooms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect();
            for r in &joined {
                if !may(&id, r, &work) {
                    t.wrongly_granted += 1;
                    t.examples.push(format!("{} auto-joined {r}", id.sub));
                }
            }
            conn = Some(Conn {
                c,
                id: id.clone(),
                joined,
                expires: Instant::now() + Duration::from_secs(life),
            });
            continue;
        };
        // One action, then read whatever comes for a short while.
        let mut pending: Option<(&'static str, String)> = None;
        let mut refreshing: Option<Ident> = None;
        match rng.gen_range(0..100) {
            0..=39 => {
                let room = match rng.gen_range(0..7) {
                    0 => format!(
                        "order:{}",
                        work.orders[rng.gen_range(0..work.orders.len())].id.to_hex()
                    ),
                    1 => {
                        let mine: Vec<_> = work
                            .orders
                            .iter()
                            .filter(|o| o.customer == cn.id.sub || cn.id.stores.contains(&o.store))
                            .collect();
                        match mine.is_empty() {
                            true => "order:000000000000000000000000".into(),
                            false => {
                                format!("order:{}", mine[rng.gen_range(0..mine.len())].id.to_hex())
                            }
                        }
                    }
                    2 => format!(
                        "customer:{}",
                        work.customers[rng.gen_range(0..work.customers.len())]
                    ),
                    3 => format!("store:{}", work.stores[rng.gen_range(0..work.stores.len())]),
                    4 => format!(
                        "storefront:{}",
                        work.stores[rng.gen_range(0..work.stores.len())]
                    ),
                    5 => "admin".into(),
                    _ => format!("customer:{}", cn.id.sub),
                };
                t.subscribes += 1;
                cn.c.send_json(json!({"type": "subscribe", "room": room}))
                    .await;
                pending = Some(("subscribe", room));
            }
            40..=54 if !cn.joined.is_empty() => {
                let rooms: Vec<_> = cn.joined.iter().cloned().collect();
                let room = rooms[rng.gen_range(0..rooms.len())].clone();
                cn.c.send_json(json!({"type": "unsubscribe", "room": room}))
                    .await;
                pending = Some(("unsubscribe", room));
            }
            55..=64 => {
                // A fresh token for the same subject; staff sometimes lose stores.
                let mut next = cn.id.clone();
                if !next.admin && !next.customer && next.stores.len() > 1 && rng.gen_bool(0.5) {
                    next.stores.truncate(1);
                    t.reduced_refreshes += 1;
                }
                t.refreshes += 1;
                let tok = next.token(now() + 3600);
                cn.c.send_json(json!({"type": "auth", "token": tok})).await;
                // Events before the reply were sent under the old token: apply on the reply.
                refreshing = Some(next);
                pending = Some(("auth", String::new()));
            }
            65..=69 => {
                conn = None;
                continue;
            }
            _ => {}
        }
        let read_until = Instant::now() + Duration::from_millis(rng.gen_range(20..200));
        loop {
            let wait = read_until.saturating_duration_since(Instant::now());
            let m = match tokio::time::timeout(wait.max(Duration::from_millis(1)), cn.c.ws.next())
                .await
            {
                Err(_) if pending.is_none() => break,
                Err(_) => {
                    // A reply is owed: wait longer for it.
                    match tokio::time::timeout(Duration::from_secs(10), cn.c.ws.next()).await {
                        Ok(m) => m,
                        Err(_) => {
                            t.examples.push(format!("no reply to {pending:?}"));
                            break;
                        }
                    }
                }
                Ok(m) => m,
            };
            let v: Value = match m {
                Some(Ok(Message::Text(s))) => serde_json::from_str(&s).unwrap(),
                Some(Ok(Message::Close(f))) => {
                    if f.as_ref().is_some_and(|f| u16::from(f.code) == 4501) {
                        t.expiries += 1;
                    }
                    conn = None;
                    break;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    conn = None;
                    break;
                }
            };
            match v["type"].as_str() {
                Some("event") => {
                    t.deliveries += 1;
                    let s = Seen::from_message(&v).unwrap();
                    if s.key.starts_with("delivery/") {
                        t.declared += 1;
                        if v["event"] == "delivery:status_changed" {
                            t.declared_status += 1;
                            // Only the store and admin may see `state`.
                            if s.room.starts_with("customer:") {
                                t.outside_rooms += 1;
                                t.examples
                                    .push(format!("a status change reached {}", s.room));
                            }
                        }
                    }
                    if !cn.joined.contains(&s.room) {
                        t.outside_rooms += 1;
                        t.examples.push(format!(
                            "{} got {} outside its rooms {:?}",
                            cn.id.sub, s.room, cn.joined
                        ));
                    }
                    if !may(&cn.id, &s.room, &work) {
                        t.outside_rights += 1;
                        t.examples.push(format!(
                            "{} (stores {:?}) got {} outside its rights",
                            cn.id.sub, cn.id.stores, s.room
                        ));
                    }
                    if !work
                        .ledger
                        .lock()
                        .unwrap()
                        .owners
                        .get(&s.key)
                        .is_some_and(|r| r.contains(&s.room))
                    {
                        t.cross_room += 1;
                    }
                    if Instant::now() > cn.expires + LEEWAY + Duration::from_secs(1) {
                        t.after_expiry += 1;
                    }
                }
                Some("subscribed") => {
                    let room = v["room"].as_str().unwrap_or_default().to_owned();
                    if !may(&cn.id, &room, &work) {
                        t.wrongly_granted += 1;
                        t.examples.push(format!("{} was granted {room}", cn.id.sub));
                    }
                    cn.joined.insert(room);
                    pending = None;
                }
                Some("unsubscribed") => {
                    cn.joined.remove(v["room"].as_str().unwrap_or_default());
                    pending = None;
                }
                Some("authenticated") => {
                    if let Some(next) = refreshing.take() {
                        cn.id = next;
                        cn.expires = Instant::now() + Duration::from_secs(3600);
                    }
                    for r in v["left"].as_array().into_iter().flatten() {
                        cn.joined.remove(r.as_str().unwrap_or_default());
                    }
                    // Whatever is still joined must be within the new rights.
                    for r in &cn.joined {
                        if !may(&cn.id, r, &work) {
                            t.wrongly_granted += 1;
                            t.examples
                                .push(format!("{} kept {r} after a refresh", cn.id.sub));
                        }
                    }
                    pending = None;
                }
                Some("error") => {
                    if let Some(("subscribe", room)) = &pending {
                        if may(&cn.id, room, &work) && v["code"] != "too_many_subscriptions" {
                            t.refused_by_server_allowed_by_model += 1;
                        }
                    }
                    pending = None;
                }
                _ => {}
            }
        }
    }
    tally.lock().unwrap().add(&t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_no_delivery_outside_a_connections_rooms_or_rights() {
    // The declared stream has no status table: its changes are plain updates.
    rights_model(DELIVERIES_STREAM, false).await;
}

/// The same with a declared stream that has a status table: a change of its status field
/// is `delivery:status_changed`, sent only to the audiences that may see the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_no_delivery_outside_rooms_or_rights_with_a_status_table() {
    rights_model(DELIVERIES_STREAM_WITH_STATUS, true).await;
}

async fn rights_model(stream: &str, states: bool) {
    let actors = size("MODEL_ACTORS", 60, 300) as usize;
    let secs = size("MODEL_SECS", 10, 120);
    let db = Arc::new(Db::start().await);
    let mut work = Workload::new(50, 20, 100).with_deliveries(60);
    if states {
        work = work.with_delivery_states();
    }
    work.seed(&db).await;
    let server = Server::start(
        &db,
        &format!("leeway = \"1s\"\n[server]\nmax_messages_per_second = 1000\n{stream}"),
    )
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = work.spawn_writer(db.clone(), 0, Some(200), stop.clone());
    let until = Instant::now() + Duration::from_secs(secs);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for i in 0..actors {
        let id = match i % 10 {
            0 => Ident {
                sub: format!("admin{i}"),
                admin: true,
                customer: false,
                stores: vec![],
            },
            1..=3 => {
                let n = 1 + i % 3;
                let stores = (0..n)
                    .map(|k| work.stores[(i + k * 7) % work.stores.len()].clone())
                    .collect();
                Ident {
                    sub: format!("staff{i}"),
                    admin: false,
                    customer: false,
                    stores,
                }
            }
            _ => Ident {
                sub: work.customers[i % work.customers.len()].clone(),
                admin: false,
                customer: true,
                stores: vec![],
            },
        };
        tasks.push(tokio::spawn(actor(
            server.ws_url(),
            work.clone(),
            id,
            i as u64,
            until,
            tally.clone(),
        )));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.cancel();
    let writes = writer.await.unwrap();
    let t = tally.lock().unwrap().clone();
    figure(
        if states {
            "hostile.model_status"
        } else {
            "hostile.model"
        },
        format!(
            "{actors} actors over {secs}s (50 customers, 20 stores, {writes} changes; {} connects, {} subscribes, {} token refreshes of which {} dropped stores, {} expiries): {} deliveries ({} of a declared stream, {} of its status changes), outside joined rooms {}, outside current rights {}, cross-room {}, subscriptions wrongly granted {}, after expiry {}, (refused though allowed {})",
            t.connects, t.subscribes, t.refreshes, t.reduced_refreshes, t.expiries, t.deliveries, t.declared, t.declared_status, t.outside_rooms, t.outside_rights, t.cross_room, t.wrongly_granted, t.after_expiry, t.refused_by_server_allowed_by_model
        ),
    );
    assert!(t.deliveries > 0);
    assert!(t.declared > 0, "no declared-stream delivery was seen");
    assert_eq!(
        states,
        t.declared_status > 0,
        "status changes seen: {}",
        t.declared_status
    );
    assert_eq!(
        t.outside_rooms + t.cross_room + t.wrongly_granted + t.after_expiry,
        0,
        "{:?}",
        t.examples
    );
    assert_eq!(t.outside_rights, 0, "{:?}", t.examples);
    assert_eq!(t.refused_by_server_allowed_by_model, 0, "{:?}", t.examples);
}

/// Owners of each order per epoch: a move sets `orderNumber` (in the order room's allowlist)
/// to a new epoch, so every delivery names the epoch whose owners it was routed for.
type Epochs = Arc<Mutex<std::collections::HashMap<String, Vec<(String, String)>>>>;

/// One actor of the ownership model: subscribes to order rooms (its own and others'), leaves
/// and reconnects with `since`, and checks every order-room delivery against the owners of the
/// epoch it carries. Returns (deliveries, outside the right at the change, ownership notices).
async fn owner_actor(
    url: String,
    id: Ident,
    orders: Vec<String>,
    epochs: Epochs,
    seed: u64,
    until: Instant,
) -> (u64, u64, u64, Vec<String>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut deliveries, mut outside, mut notices) = (0, 0, 0);
    let mut examples = Vec::new();
    let mut last: Option<String> = None;
    while Instant::now() < until {
        let mut u = url.clone();
        if let Some(s) = &last {
            u = format!("{url}?since={s}");
        }
        let Ok(mut c) = Client::try_connect_url(&u, Some(&id.token(now() + 3600)), &[]).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let life = Instant::now() + Duration::from_millis(rng.gen_range(300..1500));
        while Instant::now() < life.min(until) {
            if rng.gen_bool(0.3) {
                let o = &orders[rng.gen_range(0..orders.len())];
                let mut msg = json!({"type": "subscribe", "room": format!("order:{o}")});
                if let Some(s) = &last {
                    if rng.gen_bool(0.5) {
                        msg["since"] = json!(s);
                    }
                }
                c.send_json(msg).await;
            }
            let Some(v) = c
                .next_json_within(Duration::from_millis(rng.gen_range(10..100)))
                .await
            else {
                continue;
            };
            match v["type"].as_str() {
                Some("event") => {
                    last = v["id"].as_str().map(str::to_owned);
                    let room = v["room"].as_str().unwrap_or_default();
                    let Some(order) = room.strip_prefix("order:") else {
                        continue;
                    };
                    deliveries += 1;
                    let epoch = v["data"]["orderNumber"].as_i64().unwrap_or(-1);
                    let owners =
                        epochs.lock().unwrap().get(order).and_then(|e| {
                            usize::try_from(epoch).ok().and_then(|k| e.get(k).cloned())
                        });
                    let allowed = owners
                        .as_ref()
                        .is_some_and(|(cust, store)| *cust == id.sub || id.stores.contains(store));
                    if !allowed {
                        outside += 1;
                        if examples.len() < 5 {
                            examples.push(format!(
                                "{} got {room} epoch {epoch} owned by {owners:?}",
                                id.sub
                            ));
                        }
                    }
                }
                Some("unsubscribed") if v["reason"] == "ownership_changed" => notices += 1,
                _ => {}
            }
        }
    }
    (deliveries, outside, notices, examples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_order_rooms_follow_ownership_moves() {
    let secs = size("MODEL_MOVE_SECS", 8, 60);
    let db = Arc::new(Db::start().await);
    let server = Server::start(&db, "[server]\nmax_messages_per_second = 1000\n").await;
    let customers: Vec<String> = (0..6).map(|i| format!("mc{i}")).collect();
    let stores: Vec<String> = (0..3).map(|i| format!("ms{i}")).collect();
    let orders: Vec<String> = (0..12).map(|i| format!("mo{i}")).collect();
    let epochs: Epochs = Arc::default();
    for (i, o) in orders.iter().enumerate() {
        let (c, s) = (&customers[i % 6], &stores[i % 3]);
        epochs
            .lock()
            .unwrap()
            .insert(o.clone(), vec![(c.clone(), s.clone())]);
        db.coll("orders")
            .insert_one(bson::doc! {"_id": o, "customerId": c, "storeId": s, "status": "new", "orderNumber": 0i64})
            .await
            .unwrap();
    }
    let until = Instant::now() + Duration::from_secs(secs);
    // The writer: status changes, and moves to other owners (the model learns the new
    // epoch's owners before the write, so a delivery can never be ahead of the model).
    let writer = {
        let (db, epochs, orders, customers, stores) = (
            db.clone(),
            epochs.clone(),
            orders.clone(),
            customers.clone(),
            stores.clone(),
        );
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(7);
            let (mut moves, mut updates) = (0u64, 0u64);
            while Instant::now() < until {
                let o = &orders[rng.gen_range(0..orders.len())];
                if rng.gen_bool(0.3) {
                    let (c, s) = (
                        customers[rng.gen_range(0..customers.len())].clone(),
                        stores[rng.gen_range(0..stores.len())].clone(),
                    );
                    let k = {
                        let mut e = epochs.lock().unwrap();
                        let v = e.get_mut(o).unwrap();
                        v.push((c.clone(), s.clone()));
                        (v.len() - 1) as i64
                    };
                    db.coll("orders")
                        .update_one(
                            bson::doc! {"_id": o},
                            bson::doc! {"$set": {"customerId": c, "storeId": s, "orderNumber": k}},
                        )
                        .await
                        .unwrap();
                    moves += 1;
                } else {
                    let st =
                        ["accepted", "packing", "ready", "out_for_delivery"][rng.gen_range(0..4)];
                    db.coll("orders")
                        .update_one(bson::doc! {"_id": o}, bson::doc! {"$set": {"status": st}})
                        .await
                        .unwrap();
                    updates += 1;
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (moves, updates)
        })
    };
    let mut tasks = Vec::new();
    for (i, c) in customers.iter().enumerate() {
        let id = Ident {
            sub: c.clone(),
            admin: false,
            customer: true,
            stores: vec![],
        };
        tasks.push(tokio::spawn(owner_actor(
            server.ws_url(),
            id,
            orders.clone(),
            epochs.clone(),
            i as u64,
            until,
        )));
    }
    for (i, s) in stores.iter().enumerate() {
        let id = Ident {
            sub: format!("staff-{s}"),
            admin: false,
            customer: false,
            stores: vec![s.clone()],
        };
        tasks.push(tokio::spawn(owner_actor(
            server.ws_url(),
            id,
            orders.clone(),
            epochs.clone(),
            100 + i as u64,
            until,
        )));
    }
    let (mut deliveries, mut outside, mut notices, mut examples) = (0, 0, 0, Vec::new());
    for t in tasks {
        let (d, o, n, e) = t.await.unwrap();
        deliveries += d;
        outside += o;
        notices += n;
        examples.extend(e);
    }
    let (moves, updates) = writer.await.unwrap();
    figure(
        "hostile.model_ownership_moves",
        format!(
            "{} actors over {secs}s, {} orders, {moves} moves and {updates} status changes: {deliveries} order-room deliveries (live and replayed), outside the right at the time of the change {outside}, ownership_changed notices {notices}",
            customers.len() + stores.len(),
            orders.len()
        ),
    );
    assert!(
        moves >= 5 && deliveries >= 10,
        "too little happened: {moves} moves, {deliveries} deliveries"
    );
    assert!(notices > 0, "no session ever lost an order room");
    assert_eq!(outside, 0, "{examples:?}");
}
