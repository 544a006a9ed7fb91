//! Micro-benchmarks of one change's path through changecast, per change kind: map (normalize + route), then the hub's per-audience messages (id sealed, payload serialized) and the `/ws` frames.
//!
//! `cargo bench --bench event_path`. No MongoDB and no sockets: the inputs are change
//! documents shaped as the driver returns them (see tests/fixtures for mongod's), so a
//! regression in the mapping or encoding shows up as a number, apart from the noise of
//! a whole benchmark run. bench/analysis.md records the figures.

use std::sync::Arc;

use bson::{doc, Document};
use changecast::config::Config;
use changecast::gateway::protocol::encode_message;
use changecast::hub::{messages_for, Hub, HubConfig, WireFormat};
use changecast::idcodec::IdCodec;
use changecast::mapper::Mapper;
use changecast::metrics::Metrics;

// The allocator changecast's binary runs with: allocation is a large part of this path.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    divan::main();
}

/// The default configuration plus config.example.toml's `users` stream.
const CONFIG: &str = r#"
[[streams]]
collection = "users"
module = "balance"
tracked = ["balance"]

[streams.rooms]
customer = "_id"

[streams.allow]
customer = ["_id", "balance", "currency"]
"#;

fn mapper() -> Mapper {
    let config = Config::from_toml_str_with_env(CONFIG, "bench", &|name| {
        (name == "CHANGECAST_JWT_SECRET").then(|| "bench-secret-bench-secret-0123456789".into())
    })
    .expect("the bench config is valid");
    Mapper::new(&Arc::new(config), Arc::new(Metrics::new()))
}

/// A ~600-byte order, as bench/'s follow workload writes them.
fn order(status: &str) -> Document {
    doc! {
        "_id": "o1",
        "orderNumber": 500_001_i64,
        "customerId": "c1",
        "storeId": "s1",
        "status": status,
        "orderType": "delivery",
        "total": 42.75,
        "subtotal": 38.5,
        "currency": "EUR",
        "items": [
            { "sku": "sku-101", "name": "Flat white", "qty": 2, "price": 3.5 },
            { "sku": "sku-207", "name": "Chicken burrito bowl", "qty": 1, "price": 12.0 },
        ],
        "deliveryAddress": { "street": "221B Baker Street", "city": "London", "zip": "NW1 6XE" },
        "customerName": "Customer 1",
        "notes": "Ring twice.",
        "createdAt": bson::DateTime::from_millis(1_700_000_000_000),
        "updatedAt": bson::DateTime::from_millis(1_700_000_000_000),
    }
}

/// A change event as the driver returns it; `clusterTime` is bumped per iteration.
fn change(op: &str, coll: &str, id: &str, full: Option<Document>) -> Document {
    let mut d = doc! {
        "_id": { "_data": "8265F0A1B2000000012B022C0100296E5A100446645F69640064656F31000004" },
        "operationType": op,
        "clusterTime": bson::Timestamp { time: 1_700_000_000, increment: 1 },
        "wallTime": bson::DateTime::from_millis(1_700_000_000_000),
        "ns": { "db": "app", "coll": coll },
        "documentKey": { "_id": id },
    };
    if let Some(f) = full {
        d.insert("fullDocument", f);
    }
    d
}

fn with_update(mut d: Document, updated: Document) -> Document {
    d.insert(
        "updateDescription",
        doc! { "updatedFields": updated, "removedFields": [], "truncatedArrays": [] },
    );
    d
}

/// The change kinds of the follow workload and the apps' other collections.
fn kind(name: &str) -> Vec<Document> {
    match name {
        "order_insert" => vec![change("insert", "orders", "o1", Some(order("new")))],
        // Alternating statuses, so every update is a status change.
        "order_status" => ["accepted", "ready"]
            .iter()
            .map(|s| {
                with_update(
                    change("update", "orders", "o1", Some(order(s))),
                    doc! { "status": *s },
                )
            })
            .collect(),
        "order_other_field" => vec![with_update(
            change("update", "orders", "o1", Some(order("accepted"))),
            doc! { "notes": "Ring once." },
        )],
        "order_delete" => vec![change("delete", "orders", "o1", None)],
        "payment_status" => ["pending", "paid"]
            .iter()
            .map(|s| {
                with_update(
                    change(
                        "update",
                        "payments",
                        "p1",
                        Some(doc! {
                            "_id": "p1", "orderId": "o1", "customerId": "c1", "storeId": "s1",
                            "amount": 42.75, "currency": "EUR", "status": *s, "method": "card",
                        }),
                    ),
                    doc! { "status": *s },
                )
            })
            .collect(),
        "settings_public" => vec![with_update(
            change(
                "update",
                "settings",
                "st1",
                Some(doc! {
                    "_id": "st1", "storeId": "s1",
                    "storeBanner": "https://cdn.example.com/banners/b.png",
                    "storeLogo": "https://cdn.example.com/logos/l.png",
                    "taxEnabled": true, "paymentProvider": "stripe",
                }),
            ),
            doc! { "storeBanner": "https://cdn.example.com/banners/b.png" },
        )],
        "declared_balance" => [10_i64, 25]
            .iter()
            .map(|b| {
                with_update(
                    change(
                        "update",
                        "users",
                        "c1",
                        Some(doc! { "_id": "c1", "balance": *b, "currency": "EUR" }),
                    ),
                    doc! { "balance": *b },
                )
            })
            .collect(),
        other => panic!("unknown change kind {other}"),
    }
}

const KINDS: &[&str] = &[
    "order_insert",
    "order_status",
    "order_other_field",
    "order_delete",
    "payment_status",
    "settings_public",
    "declared_balance",
];

/// Feeds the same few changes as the server sends them (raw BSON, read in place).
/// Their `clusterTime` stays: the sequencer numbers equal times as one transaction's.
struct Feed {
    changes: Vec<bson::RawDocumentBuf>,
    next: usize,
}

impl Feed {
    fn new(name: &str) -> Self {
        Self {
            changes: kind(name)
                .iter()
                .map(|d| bson::RawDocumentBuf::from_document(d).expect("encodes"))
                .collect(),
            next: 0,
        }
    }

    fn next(&mut self) -> &bson::RawDocument {
        self.next = (self.next + 1) % self.changes.len();
        &self.changes[self.next]
    }
}

/// `Mapper::map_raw`: normalize, route, per-audience payloads written as JSON text.
#[divan::bench(args = KINDS)]
fn map(bencher: divan::Bencher, kind: &str) {
    let mut mapper = mapper();
    let mut feed = Feed::new(kind);
    bencher.bench_local(|| {
        let routed = mapper.map_raw(feed.next()).expect("ordered");
        divan::black_box(routed);
    });
}

/// What the stream does per change with no client connected and with one per
/// audience: map, then the hub's messages (id sealed once, each payload serialized
/// once) and each message's `/ws` frame.
#[divan::bench(args = KINDS)]
fn map_and_encode(bencher: divan::Bencher, kind: &str) {
    let mut mapper = mapper();
    let ids = std::sync::Arc::new(IdCodec::for_jwt_secret(
        b"bench-secret-bench-secret-0123456789",
    ));
    let mut feed = Feed::new(kind);
    bencher.bench_local(|| {
        let routed = mapper.map_raw(feed.next()).expect("ordered");
        for ev in &routed {
            for m in messages_for(ev, &ids) {
                divan::black_box(m.encoded(WireFormat::Native, |m| {
                    smallvec::smallvec![encode_message(m).into()]
                }));
            }
        }
    });
}

/// Orders in [`follow`]'s ring: twice the default history, so every change ages one out.
const FOLLOW_ORDERS: usize = 20_000;

/// bench/'s follow workload in process: [`FOLLOW_ORDERS`] ~600-byte orders inserted, then
/// each moved to `accepted`, over and over, each change with its own resume token and a
/// later cluster time (patched in place per change).
struct Ring {
    changes: Vec<Vec<u8>>,
    /// Where each change's `clusterTime` value starts in its bytes.
    at: Vec<usize>,
    next: usize,
    time: u32,
}

impl Ring {
    fn new() -> Self {
        let mut changes = Vec::with_capacity(2 * FOLLOW_ORDERS);
        for step in 0..2 {
            for i in 0..FOLLOW_ORDERS {
                let id = format!("o{i}");
                let mut full = order(if step == 0 { "new" } else { "accepted" });
                full.insert("_id", id.as_str());
                full.insert("customerId", format!("c{}", i % 5_000));
                full.insert("storeId", format!("s{}", i % 50));
                let mut d = change(
                    if step == 0 { "insert" } else { "update" },
                    "orders",
                    &id,
                    Some(full),
                );
                d.insert(
                    "_id",
                    doc! { "_data": format!("8265F0A1B2{:08X}{i:08X}2B022C0100296E5A1004", step) },
                );
                if step == 1 {
                    d = with_update(d, doc! { "status": "accepted" });
                }
                changes.push(bson::to_vec(&d).expect("encodes"));
            }
        }
        let at = changes
            .iter()
            .map(|b| {
                let raw = bson::RawDocument::from_bytes(b).expect("a document");
                let Some(Ok(bson::RawBsonRef::Timestamp(_))) = raw.get("clusterTime").transpose()
                else {
                    panic!("every change has a clusterTime");
                };
                // The value is the 8 bytes after the key's name and its NUL.
                let key = b"\x11clusterTime\0";
                b.windows(key.len()).position(|w| w == key).expect("found") + key.len()
            })
            .collect();
        Self {
            changes,
            at,
            next: 0,
            time: 1_700_000_000,
        }
    }

    fn next(&mut self) -> &bson::RawDocument {
        let i = self.next;
        self.next = (i + 1) % self.changes.len();
        self.time += 1;
        let ts = (u64::from(self.time) << 32) | 1;
        self.changes[i][self.at[i]..self.at[i] + 8].copy_from_slice(&ts.to_le_bytes());
        bson::RawDocument::from_bytes(&self.changes[i]).expect("a document")
    }
}

/// Following the stream with no client connected, as bench/'s `follow` phase does in the
/// process: map, then publish into a hub keeping the default 10,000 changes of history
/// (each change also ages one out and its never-written payloads are dropped), over
/// 20,000 orders, so the per-document memory and the room maps hold what they would.
#[divan::bench(sample_count = 200, sample_size = 200)]
fn follow(bencher: divan::Bencher) {
    let mut mapper = mapper();
    let hub = Hub::new(HubConfig::default(), Arc::new(Metrics::new()));
    let mut ring = Ring::new();
    let mut step = |ring: &mut Ring| {
        for ev in mapper.map_raw(ring.next()).expect("ordered") {
            hub.publish(&ev);
        }
    };
    // History full and every order remembered before the first sample.
    for _ in 0..2 * FOLLOW_ORDERS {
        step(&mut ring);
    }
    bencher.bench_local(|| step(&mut ring));
}
