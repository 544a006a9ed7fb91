//! The writer's side: order and settings updates through the MongoDB driver, or the
//! same updates as pre-encoded frames over the raw server's control channel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bson::{doc, Document};
use mongodb::options::ClientOptions;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Legacy order statuses, walked in order (orders are seeded at `new`).
pub const STATUSES: [&str; 6] = [
    "new",
    "accepted",
    "packing",
    "ready",
    "out_for_delivery",
    "completed",
];

/// The storefront every client of workload B joins; no store dashboard belongs to it.
pub const STOREFRONT: &str = "sf";

/// Settings documents of the storefront, written in rotation. `updateLookup`
/// returns a document as it is when the server looks it up, not as the change
/// left it, so a document must never be rewritten while an earlier write to it
/// may still be undelivered: B keeps at most a few writes owed, far fewer than this.
pub const STOREFRONT_DOCS: u64 = 16;

/// Database the seed data and the writer use.
pub const DATABASE: &str = "app";

/// One update.
#[derive(Debug, Clone, Copy)]
pub enum Write {
    /// Order `order` moves to `status`.
    Order {
        /// Order index.
        order: u32,
        /// Store count (order `i` belongs to store `i % stores`).
        stores: u32,
        /// New legacy status.
        status: &'static str,
    },
    /// The storefront's banner changes.
    Banner,
}

/// Where writes go.
pub enum Sink {
    /// MongoDB (mongo-sim) through the official driver.
    Mongo {
        /// `app.orders`.
        orders: mongodb::Collection<Document>,
        /// `app.settings`.
        settings: mongodb::Collection<Document>,
    },
    /// The raw server's control channel.
    Raw(RawControl),
}

impl Sink {
    /// Connects to MongoDB with a pool big enough for `concurrency` writes in flight.
    pub async fn mongo(uri: &str, concurrency: u32) -> anyhow::Result<Self> {
        let mut options = ClientOptions::parse(uri).await?;
        options.max_pool_size = Some(concurrency.max(1));
        let client = mongodb::Client::with_options(options)?;
        let db = client.database(DATABASE);
        Ok(Self::Mongo {
            orders: db.collection("orders"),
            settings: db.collection("settings"),
        })
    }

    /// Connects to the raw server's control channel.
    pub async fn raw(control: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self::Raw(RawControl::connect(control).await?))
    }

    /// Performs write `seq` and returns once it is acknowledged.
    pub async fn write(&self, seq: u64, write: Write) -> anyhow::Result<()> {
        let marker = format!("bseq-{seq}");
        match self {
            Sink::Mongo { orders, settings } => {
                let result = match write {
                    Write::Order { order, status, .. } => {
                        orders
                            .update_one(
                                doc! { "_id": format!("o{order}") },
                                doc! { "$set": { "status": status, "updatedAt": marker } },
                            )
                            .await?
                    }
                    Write::Banner => {
                        settings
                            .update_one(
                                doc! { "_id": format!("settings-{STOREFRONT}-{}", seq % STOREFRONT_DOCS) },
                                doc! { "$set": { "storeBanner": format!("https://cdn.example.com/banners/{marker}.png") } },
                            )
                            .await?
                    }
                };
                anyhow::ensure!(result.matched_count == 1, "write {seq} matched no document");
                Ok(())
            }
            Sink::Raw(control) => control.publish(raw_line(seq, write)).await,
        }
    }
}

/// Drops and seeds `app.orders` (one order per customer) and `app.settings`.
pub async fn seed(uri: &str, customers: u32, stores: u32) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let db = client.database(DATABASE);
    let orders = db.collection::<Document>("orders");
    let settings = db.collection::<Document>("settings");
    orders.drop().await?;
    settings.drop().await?;
    db.collection::<Document>("payments").drop().await?;
    let now = bson::DateTime::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..customers {
        batch.push(doc! {
            "_id": format!("o{i}"),
            "orderNumber": i64::from(i) + 100_000,
            "customerId": format!("c{i}"),
            "storeId": format!("s{}", i % stores.max(1)),
            "status": STATUSES[0],
            "orderType": if i % 2 == 0 { "delivery" } else { "pickup" },
            "total": 25.5,
            "subtotal": 22.0,
            "currency": "EUR",
            "items": [{ "sku": "sku-1", "name": "Flat white", "qty": 2, "price": 11.0 }],
            "customerName": format!("Customer {i}"),
            "notes": "",
            "createdAt": now,
            "updatedAt": "seed",
        });
        if batch.len() == 1000 {
            orders.insert_many(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        orders.insert_many(batch).await?;
    }
    let storefront = (0..STOREFRONT_DOCS).map(|k| {
        doc! {
            "_id": format!("settings-{STOREFRONT}-{k}"),
            "storeId": STOREFRONT,
            "storeBanner": "https://cdn.example.com/banners/seed.png",
            "storeLogo": "https://cdn.example.com/logos/sf.png",
            "taxEnabled": true,
            "paymentProvider": "stripe",
        }
    });
    settings.insert_many(storefront).await?;
    Ok(())
}

/// The frame a raw-server client receives for a write, shaped like changecast's native event.
fn raw_line(seq: u64, write: Write) -> String {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // Resume-token-sized id so frames weigh what changecast's do.
    let id = format!("8267{seq:060x}0004");
    match write {
        Write::Order {
            order,
            stores,
            status,
        } => {
            let store = order % stores.max(1);
            let frame = serde_json::json!({
                "type": "event", "id": id, "event": "order:status_changed",
                "room": format!("customer:c{order}"), "ts": ts,
                "data": {
                    "_id": format!("o{order}"), "orderId": format!("o{order}"),
                    "orderNumber": i64::from(order) + 100_000, "status": status,
                    "rawStatus": status, "orderType": "delivery", "total": 25.5,
                    "currency": "EUR", "updatedAt": format!("bseq-{seq}"),
                },
            });
            format!("customer:c{order} store:s{store}\t{frame}\n")
        }
        Write::Banner => {
            let frame = serde_json::json!({
                "type": "event", "id": id, "event": "settings:updated",
                "room": format!("storefront:{STOREFRONT}"), "ts": ts,
                "data": {
                    "storeId": STOREFRONT,
                    "storeBanner": format!("https://cdn.example.com/banners/bseq-{seq}.png"),
                    "changedFields": ["storeBanner"],
                },
            });
            format!("storefront:{STOREFRONT}\t{frame}\n")
        }
    }
}

/// A pipelined control connection: lines go out in order, `+` replies come back in order.
pub struct RawControl {
    writer: Mutex<(OwnedWriteHalf, mpsc::Sender<oneshot::Sender<()>>)>,
    failures: AtomicU64,
}

/// Commands in flight on the control connection; the writer's own concurrency
/// limit is far below it, so `send` never waits here in practice.
const CONTROL_PIPELINE: usize = 65_536;

impl RawControl {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        // Bounded by the pipeline depth; a full queue makes `publish` wait (backpressure).
        let (tx, mut rx) = mpsc::channel::<oneshot::Sender<()>>(CONTROL_PIPELINE);
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(waiter) = rx.recv().await else { break };
                if line == "+" {
                    let _ = waiter.send(());
                }
                // Any other reply drops the waiter: that publish reports failure.
            }
        });
        Ok(Self {
            writer: Mutex::new((write, tx)),
            failures: AtomicU64::new(0),
        })
    }

    async fn publish(&self, line: String) -> anyhow::Result<()> {
        let (done, acked) = oneshot::channel();
        {
            // Writing the line and queueing its waiter under one lock keeps replies in order.
            let mut guard = self.writer.lock().await;
            let (write, waiters) = &mut *guard;
            waiters.send(done).await?;
            write.write_all(line.as_bytes()).await?;
        }
        acked.await.map_err(|_| {
            self.failures.fetch_add(1, Ordering::Relaxed);
            anyhow::anyhow!("raw server refused a publish")
        })
    }
}
