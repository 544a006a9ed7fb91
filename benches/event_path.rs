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
use changecast::hub::{messages_for, WireFormat};
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
                divan::black_box(m.encoded(WireFormat::Native, encode_message));
            }
        }
    });
}
