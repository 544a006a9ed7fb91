//! Demo traffic: writes orders, payments, settings and a customer's balance through the MongoDB driver the way the Node apps do; knows nothing of changecast.
//!
//! The generator is split in two: [`Traffic`] is a pure, seeded planner that
//! decides the next write (so its behaviour is unit-tested without a
//! database), and [`run`] paces it and applies each write with the driver.
//! Orders use the apps' legacy statuses (`new`, `accepted`, `packing`,
//! `ready`, `out_for_delivery`, `completed`, `cancelled`); changecast's
//! normalizer is what turns them into canonical ones, exactly as in production.

use std::time::Duration;

use anyhow::{bail, Context as _};
use bson::oid::ObjectId;
use bson::{doc, Bson, DateTime, Document};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

/// The customer the dashboard's order tracker follows; always has a live order.
pub(crate) const FOCUS_CUSTOMER: &str = "c1";
/// The store whose board and storefront the dashboard shows; the focus customer orders there.
pub(crate) const FOCUS_STORE: &str = "s1";
/// Subject of the demo's storefront visitor token (a shopper with no stores).
pub(crate) const VISITOR: &str = "visitor-1";

/// Live (not yet finished) orders per store. Finished orders are never
/// written again, so this bounds both the board and the write mix.
const LIVE_ORDERS_PER_STORE: usize = 2;
/// Share of ticks spent on a settings edit instead of an order or payment.
const SETTINGS_EDIT_P: f64 = 0.08;
/// Share of order advances that pick the focus customer's order, so the
/// tracker moves every few seconds at the default rate.
const FOCUS_ADVANCE_P: f64 = 0.35;
/// Share of ticks spent on the focus customer's balance (a top-up or a spend), so
/// the tracker's balance moves every few seconds at the default rate.
const BALANCE_EDIT_P: f64 = 0.1;
/// The focus customer's balance when the demo starts, in whole dollars (integers,
/// so the tracker's old → new and difference are exact).
const OPENING_BALANCE: i64 = 40;
/// Below this the next balance change is a top-up, so the balance never goes negative.
const LOW_BALANCE: i64 = 15;
/// The collection of the demo's declared stream (`[[streams]]` in `demo_config`).
pub(crate) const USERS_COLLECTION: &str = "users";
/// Probability that a payment fails (the order is then cancelled).
const PAYMENT_FAIL_P: f64 = 0.12;
/// Probability that a new, paid order is cancelled by the store (payment refunded).
const CANCEL_P: f64 = 0.05;
/// Probability that a completed order is refunded afterwards.
const REFUND_P: f64 = 0.08;
/// Consecutive failed writes after which [`run`] gives up.
const MAX_CONSECUTIVE_FAILURES: u32 = 20;
/// Accepted range of `rate_per_sec`: slower looks dead, faster is a load test, not a demo.
pub(crate) const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.05..=500.0;

/// What the generator writes and how fast.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TrafficConfig {
    /// Database the orders, payments and settings collections live in (default `app`).
    pub(crate) database: String,
    /// Writes per second (default 2).
    pub(crate) rate_per_sec: f64,
    /// Number of stores `s1..sN` (default 3).
    pub(crate) stores: usize,
    /// Number of customers `c1..cN` (default 4).
    pub(crate) customers: usize,
    /// Seed of the action sequence; the same seed gives the same sequence of writes.
    pub(crate) seed: u64,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            database: "app".into(),
            rate_per_sec: 2.0,
            stores: 3,
            customers: 4,
            seed: 7,
        }
    }
}

impl TrafficConfig {
    /// The ids this configuration writes for.
    pub(crate) fn principals(&self) -> DemoPrincipals {
        DemoPrincipals {
            customers: (1..=self.customers.max(1))
                .map(|n| format!("c{n}"))
                .collect(),
            stores: (1..=self.stores.max(1)).map(|n| format!("s{n}")).collect(),
            visitor: VISITOR.into(),
        }
    }
}

/// The demo's principals: deterministic string ids the traffic uses and the demo's tokens name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DemoPrincipals {
    /// Customer ids (`c1`, `c2`, …); the first is [`FOCUS_CUSTOMER`].
    pub(crate) customers: Vec<String>,
    /// Store ids (`s1`, `s2`, …); the first is [`FOCUS_STORE`].
    pub(crate) stores: Vec<String>,
    /// The storefront visitor's subject.
    pub(crate) visitor: String,
}

/// The principals of the default [`TrafficConfig`].
#[cfg(test)]
pub(crate) fn demo_principals() -> DemoPrincipals {
    TrafficConfig::default().principals()
}

/// Writes pseudo-realistic traffic into `cfg.database` until `stop` fires.
///
/// Seeds one settings document per store (upsert, so a restart against the
/// same database is fine), then performs one write per `1 / rate_per_sec`
/// seconds. Fails on a bad config or after
/// `MAX_CONSECUTIVE_FAILURES` write errors in a row; single failures are
/// logged and skipped (the next write does not depend on them being applied).
pub(crate) async fn run(
    client: mongodb::Client,
    cfg: TrafficConfig,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    if !RATE_RANGE.contains(&cfg.rate_per_sec) {
        bail!(
            "traffic rate {} per second is outside {}..={}",
            cfg.rate_per_sec,
            RATE_RANGE.start(),
            RATE_RANGE.end()
        );
    }
    let db = client.database(&cfg.database);
    let mut traffic = Traffic::new(&cfg);
    for w in traffic.seed_writes(DateTime::now()) {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            r = apply(&db, &w) => r.with_context(|| format!("seeding demo data: {}", w.describe()))?,
        }
    }
    tracing::info!(
        database = %cfg.database,
        rate = cfg.rate_per_sec,
        stores = cfg.stores,
        customers = cfg.customers,
        "demo traffic started"
    );

    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / cfg.rate_per_sec));
    // After a stall (a slow write, a paused laptop) keep the pace instead of bursting to catch up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let w = traffic.step(DateTime::now());
        let res = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            r = apply(&db, &w) => r,
        };
        match res {
            Ok(()) => {
                failures = 0;
                tracing::debug!(write = %w.describe(), "demo traffic");
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, write = %w.describe(), failures, "demo traffic write failed");
                if failures >= MAX_CONSECUTIVE_FAILURES {
                    return Err(e).context("demo traffic: too many failed writes in a row");
                }
            }
        }
    }
}

async fn apply(db: &mongodb::Database, w: &Write) -> anyhow::Result<()> {
    let coll = db.collection::<Document>(w.coll().name());
    match w {
        Write::Insert { doc, .. } => {
            coll.insert_one(doc).await?;
        }
        Write::Set { id, set, .. } => {
            coll.update_one(doc! {"_id": id.clone()}, doc! {"$set": set.clone()})
                .await?;
        }
        Write::Upsert { id, doc, .. } => {
            coll.replace_one(doc! {"_id": id.clone()}, doc)
                .upsert(true)
                .await?;
        }
    }
    Ok(())
}

/// A collection the demo writes to (the default names of `[mongodb.collections]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coll {
    Orders,
    Payments,
    Settings,
    Users,
}

impl Coll {
    fn name(self) -> &'static str {
        match self {
            Coll::Orders => "orders",
            Coll::Payments => "payments",
            Coll::Settings => "settings",
            Coll::Users => USERS_COLLECTION,
        }
    }
}

/// One write the planner decided on.
#[derive(Debug, Clone, PartialEq)]
enum Write {
    Insert { coll: Coll, doc: Document },
    Set { coll: Coll, id: Bson, set: Document },
    Upsert { coll: Coll, id: Bson, doc: Document },
}

impl Write {
    fn coll(&self) -> Coll {
        match self {
            Write::Insert { coll, .. } | Write::Set { coll, .. } | Write::Upsert { coll, .. } => {
                *coll
            }
        }
    }

    /// A one-line summary for logs.
    fn describe(&self) -> String {
        match self {
            Write::Insert { coll, doc } => {
                let status = doc.get_str("status").unwrap_or("");
                format!("insert {} status={status}", coll.name())
            }
            Write::Set { coll, id, set } => {
                let keys: Vec<&str> = set.keys().map(String::as_str).collect();
                let status = set.get_str("status").map(|s| format!(" status={s}"));
                format!(
                    "update {} {id} set [{}]{}",
                    coll.name(),
                    keys.join(", "),
                    status.unwrap_or_default()
                )
            }
            Write::Upsert { coll, id, .. } => format!("upsert {} {id}", coll.name()),
        }
    }
}

/// Where one live order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Inserted as `new`; next: the checkout's payment is inserted.
    Created,
    /// Payment `pending`; next: it succeeds or fails.
    PaymentPending,
    /// Payment failed; next: the order is cancelled.
    PaymentFailed,
    /// One of the store's legacy statuses; next: the following one.
    Status(usize),
    /// Completed, to be refunded; next: the payment is refunded.
    RefundDue,
}

/// The legacy status walk of a delivery order; pickup orders skip `out_for_delivery`.
const DELIVERY_FLOW: [&str; 6] = [
    "new",
    "accepted",
    "packing",
    "ready",
    "out_for_delivery",
    "completed",
];
const PICKUP_FLOW: [&str; 5] = ["new", "accepted", "packing", "ready", "completed"];

#[derive(Debug, Clone)]
struct LiveOrder {
    id: ObjectId,
    customer: String,
    store: String,
    pickup: bool,
    total: f64,
    stage: Stage,
    payment: Option<ObjectId>,
}

impl LiveOrder {
    fn flow(&self) -> &'static [&'static str] {
        if self.pickup {
            &PICKUP_FLOW
        } else {
            &DELIVERY_FLOW
        }
    }
}

const MENU: [(&str, f64); 8] = [
    ("Flat white", 3.8),
    ("Sourdough loaf", 6.5),
    ("Cinnamon bun", 3.2),
    ("Granola jar", 8.9),
    ("Cold brew", 4.4),
    ("Olive oil 500ml", 12.0),
    ("Tomato seeds", 2.5),
    ("Ceramic mug", 15.0),
];
const NAMES: [&str; 6] = ["Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara"];
const CITIES: [&str; 4] = ["Lisbon", "Porto", "Braga", "Faro"];
const BANNER_THEMES: [&str; 6] = ["summer", "autumn", "spring", "night", "sale", "harvest"];
const LOGO_VARIANTS: [&str; 4] = ["round", "square", "mono", "color"];
const STORIES: [&str; 5] = [
    "Family bakery since 1987, baking before sunrise.",
    "Small-batch roasters. We know every farm by name.",
    "Seeds, soil and patience: a garden shop run by gardeners.",
    "Hand-thrown ceramics from our studio by the river.",
    "Now open on Sundays! Come say hi.",
];
const PROVIDERS: [&str; 3] = ["stripe", "paypal", "square"];
const METHODS: [&str; 3] = ["card", "apple_pay", "paypal"];

/// The seeded planner: decides each write from its own state and RNG, never reads the database.
#[derive(Debug)]
struct Traffic {
    rng: StdRng,
    customers: Vec<String>,
    stores: Vec<String>,
    live: Vec<LiveOrder>,
    max_live: usize,
    next_order_number: i64,
    /// The focus customer's balance as last written.
    balance: i64,
}

impl Traffic {
    fn new(cfg: &TrafficConfig) -> Self {
        let p = cfg.principals();
        Self {
            rng: StdRng::seed_from_u64(cfg.seed),
            max_live: LIVE_ORDERS_PER_STORE * p.stores.len(),
            customers: p.customers,
            stores: p.stores,
            live: Vec::new(),
            next_order_number: 1001,
            balance: OPENING_BALANCE,
        }
    }

    /// One settings document per store, with public and private fields, then the
    /// focus customer's user document with its opening balance.
    fn seed_writes(&mut self, now: DateTime) -> Vec<Write> {
        let stores = self.stores.clone();
        let user = Write::Upsert {
            coll: Coll::Users,
            id: Bson::String(FOCUS_CUSTOMER.into()),
            doc: doc! {
                "_id": FOCUS_CUSTOMER,
                "name": NAMES[0],
                "balance": self.balance,
                "currency": "USD",
                "updatedAt": now,
            },
        };
        stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let id = Bson::String(format!("settings-{store}"));
                let doc = doc! {
                    "_id": id.clone(),
                    "storeId": store,
                    "username": format!("shop-{store}"),
                    "storeBanner": banner(store, BANNER_THEMES[i % BANNER_THEMES.len()]),
                    "storeLogo": logo(store, LOGO_VARIANTS[i % LOGO_VARIANTS.len()]),
                    "aboutStory": STORIES[i % STORIES.len()],
                    "contactEmail": format!("hello@{store}.shop.example"),
                    "storeActive": true,
                    "paymentProvider": PROVIDERS[i % PROVIDERS.len()],
                    "taxEnabled": i % 2 == 0,
                    "customDomain": format!("{store}.example.com"),
                    "shippingPrice": 4.99,
                    "warehouseCity": CITIES[i % CITIES.len()],
                    "updatedAt": now,
                };
                Write::Upsert {
                    coll: Coll::Settings,
                    id,
                    doc,
                }
            })
            .chain([user])
            .collect()
    }

    /// The focus customer tops up or spends: their balance moves on the tracker.
    fn balance_change(&mut self, now: DateTime) -> Write {
        let amount = if self.balance < LOW_BALANCE || self.rng.gen_bool(0.35) {
            *[10, 20, 25].choose(&mut self.rng).unwrap_or(&10)
        } else {
            -self.rng.gen_range(3..=LOW_BALANCE.min(self.balance))
        };
        self.balance += amount;
        Write::Set {
            coll: Coll::Users,
            id: Bson::String(FOCUS_CUSTOMER.into()),
            set: doc! {"balance": self.balance, "updatedAt": now},
        }
    }

    /// The next write.
    fn step(&mut self, now: DateTime) -> Write {
        if self.rng.gen_bool(SETTINGS_EDIT_P) {
            return self.settings_edit(now);
        }
        if self.rng.gen_bool(BALANCE_EDIT_P) {
            return self.balance_change(now);
        }
        let focus_idle = !self.live.iter().any(|o| o.customer == FOCUS_CUSTOMER);
        let room = self.live.len() < self.max_live;
        if room && (focus_idle || self.live.is_empty() || self.rng.gen_bool(0.3)) {
            return self.create_order(now, focus_idle);
        }
        let idx = self.pick_live();
        self.advance(idx, now)
    }

    /// Index of the live order to advance; the caller ensures `live` is non-empty.
    fn pick_live(&mut self) -> usize {
        let focus = self.live.iter().position(|o| o.customer == FOCUS_CUSTOMER);
        match focus {
            Some(i) if self.rng.gen_bool(FOCUS_ADVANCE_P) => i,
            _ => self.rng.gen_range(0..self.live.len()),
        }
    }

    fn create_order(&mut self, now: DateTime, for_focus: bool) -> Write {
        let (customer, store) = if for_focus {
            (FOCUS_CUSTOMER.to_owned(), FOCUS_STORE.to_owned())
        } else {
            (
                pick(&mut self.rng, &self.customers).to_owned(),
                pick(&mut self.rng, &self.stores).to_owned(),
            )
        };
        let pickup = self.rng.gen_bool(0.4);
        let n_items = self.rng.gen_range(1..=3);
        let mut items = Vec::with_capacity(n_items);
        let mut total = 0.0;
        for (name, price) in MENU.choose_multiple(&mut self.rng, n_items) {
            let qty: i32 = self.rng.gen_range(1..=3);
            total += price * f64::from(qty);
            items.push(doc! {"name": *name, "qty": qty, "price": *price});
        }
        if !pickup {
            total += 4.99;
        }
        let total = (total * 100.0).round() / 100.0;
        let id = ObjectId::new();
        let number = self.next_order_number;
        self.next_order_number += 1;
        let customer_name = NAMES[customer_index(&customer) % NAMES.len()];
        let mut doc = doc! {
            "_id": id,
            "orderNumber": number,
            "customerId": &customer,
            "customerName": customer_name,
            "storeId": &store,
            "status": "new",
            "orderType": if pickup { "pickup" } else { "delivery" },
            "items": items,
            "total": total,
            "currency": "USD",
            "createdAt": now,
            "updatedAt": now,
        };
        if !pickup {
            let city = pick(&mut self.rng, &CITIES).to_owned();
            let street = self.rng.gen_range(1..200);
            doc.insert(
                "deliveryAddress",
                doc! {"street": format!("{street} Rua Augusta"), "city": city},
            );
        }
        self.live.push(LiveOrder {
            id,
            customer,
            store,
            pickup,
            total,
            stage: Stage::Created,
            payment: None,
        });
        Write::Insert {
            coll: Coll::Orders,
            doc,
        }
    }

    /// Moves live order `idx` one step; removes it once it will never change again.
    fn advance(&mut self, idx: usize, now: DateTime) -> Write {
        let Some(order) = self.live.get(idx).cloned() else {
            // Unreachable by construction (idx comes from pick_live); stay total anyway.
            return self.create_order(now, false);
        };
        let (next_stage, write) = match order.stage {
            Stage::Created => {
                let pid = ObjectId::new();
                let method = pick(&mut self.rng, &METHODS).to_owned();
                let doc = doc! {
                    "_id": pid,
                    "orderId": order.id,
                    "customerId": &order.customer,
                    "storeId": &order.store,
                    "amount": order.total,
                    "currency": "USD",
                    "status": "pending",
                    "method": method,
                    "createdAt": now,
                    "updatedAt": now,
                };
                if let Some(o) = self.live.get_mut(idx) {
                    o.payment = Some(pid);
                }
                let write = Write::Insert {
                    coll: Coll::Payments,
                    doc,
                };
                (Some(Stage::PaymentPending), write)
            }
            Stage::PaymentPending => {
                let failed = self.rng.gen_bool(PAYMENT_FAIL_P);
                let status = if failed { "failed" } else { "succeeded" };
                let next = if failed {
                    Stage::PaymentFailed
                } else {
                    Stage::Status(1)
                };
                (Some(next), self.set_payment(&order, status, now))
            }
            Stage::PaymentFailed => (None, self.set_order(&order, "cancelled", now)),
            Stage::Status(1) if self.rng.gen_bool(CANCEL_P) => {
                // The store declined the paid order: cancelled now, refunded next.
                (
                    Some(Stage::RefundDue),
                    self.set_order(&order, "cancelled", now),
                )
            }
            Stage::Status(i) => {
                let flow = order.flow();
                let status = flow.get(i).copied().unwrap_or("completed");
                let last = i + 1 >= flow.len();
                let next = if !last {
                    Some(Stage::Status(i + 1))
                } else if self.rng.gen_bool(REFUND_P) {
                    Some(Stage::RefundDue)
                } else {
                    None
                };
                (next, self.set_order(&order, status, now))
            }
            Stage::RefundDue => (None, self.set_payment(&order, "refunded", now)),
        };
        match next_stage {
            Some(s) => {
                if let Some(o) = self.live.get_mut(idx) {
                    o.stage = s;
                }
            }
            None => {
                self.live.swap_remove(idx);
            }
        }
        write
    }

    fn set_order(&self, order: &LiveOrder, status: &str, now: DateTime) -> Write {
        Write::Set {
            coll: Coll::Orders,
            id: Bson::ObjectId(order.id),
            set: doc! {"status": status, "updatedAt": now},
        }
    }

    fn set_payment(&self, order: &LiveOrder, status: &str, now: DateTime) -> Write {
        match order.payment {
            Some(pid) => Write::Set {
                coll: Coll::Payments,
                id: Bson::ObjectId(pid),
                set: doc! {"status": status, "updatedAt": now},
            },
            // Every stage after Created has a payment; fall back to a harmless order touch.
            None => Write::Set {
                coll: Coll::Orders,
                id: Bson::ObjectId(order.id),
                set: doc! {"updatedAt": now},
            },
        }
    }

    /// A settings edit: public (storefront-visible), private, or both in one update.
    fn settings_edit(&mut self, now: DateTime) -> Write {
        let store = if self.rng.gen_bool(0.5) {
            FOCUS_STORE.to_owned()
        } else {
            pick(&mut self.rng, &self.stores).to_owned()
        };
        let mut set = Document::new();
        let kind = self.rng.gen_range(0..10);
        if kind < 7 {
            self.public_edit(&store, &mut set);
        }
        if kind >= 5 {
            self.private_edit(&mut set);
        }
        set.insert("updatedAt", now);
        Write::Set {
            coll: Coll::Settings,
            id: Bson::String(format!("settings-{store}")),
            set,
        }
    }

    fn public_edit(&mut self, store: &str, set: &mut Document) {
        match self.rng.gen_range(0..5) {
            0 | 1 => {
                let theme = pick(&mut self.rng, &BANNER_THEMES);
                set.insert("storeBanner", banner(store, theme));
            }
            2 => {
                let variant = pick(&mut self.rng, &LOGO_VARIANTS);
                set.insert("storeLogo", logo(store, variant));
            }
            3 => {
                set.insert("aboutStory", pick(&mut self.rng, &STORIES));
            }
            _ => {
                set.insert("storeActive", self.rng.gen_bool(0.7));
            }
        }
    }

    fn private_edit(&mut self, set: &mut Document) {
        match self.rng.gen_range(0..3) {
            0 => {
                set.insert("paymentProvider", pick(&mut self.rng, &PROVIDERS));
            }
            1 => {
                set.insert("taxEnabled", self.rng.gen_bool(0.5));
            }
            _ => {
                let cents: i32 = self.rng.gen_range(0..1300);
                set.insert("shippingPrice", f64::from(cents) / 100.0);
            }
        }
    }
}

fn pick<'a, T: AsRef<str>>(rng: &mut StdRng, from: &'a [T]) -> &'a str {
    from.choose(rng).map(AsRef::as_ref).unwrap_or_default()
}

/// `c3` → 2; anything else → 0.
fn customer_index(id: &str) -> usize {
    id.strip_prefix('c')
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |n| n.saturating_sub(1))
}

fn banner(store: &str, theme: &str) -> String {
    format!("https://cdn.shop.example/{store}/banners/{theme}.jpg")
}

fn logo(store: &str, variant: &str) -> String {
    format!("https://cdn.shop.example/{store}/logos/{variant}.png")
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    const PUBLIC: [&str; 5] = [
        "storeBanner",
        "storeLogo",
        "aboutStory",
        "storeActive",
        "updatedAt",
    ];
    const PRIVATE: [&str; 3] = ["paymentProvider", "taxEnabled", "shippingPrice"];

    fn run_steps(seed: u64, n: usize) -> (Traffic, Vec<Write>) {
        let cfg = TrafficConfig {
            seed,
            ..TrafficConfig::default()
        };
        let mut t = Traffic::new(&cfg);
        let now = DateTime::from_millis(1_700_000_000_000);
        let writes = (0..n).map(|_| t.step(now)).collect();
        (t, writes)
    }

    /// Replays the writes into per-order status histories.
    fn order_histories(writes: &[Write]) -> HashMap<ObjectId, (String, Vec<String>)> {
        let mut h: HashMap<ObjectId, (String, Vec<String>)> = HashMap::new();
        for w in writes {
            match w {
                Write::Insert {
                    coll: Coll::Orders,
                    doc,
                } => {
                    let id = doc.get_object_id("_id").unwrap();
                    let ty = doc.get_str("orderType").unwrap().to_owned();
                    h.insert(id, (ty, vec![doc.get_str("status").unwrap().to_owned()]));
                }
                Write::Set {
                    coll: Coll::Orders,
                    id: Bson::ObjectId(id),
                    set,
                } => {
                    if let Ok(s) = set.get_str("status") {
                        h.get_mut(id).unwrap().1.push(s.to_owned());
                    }
                }
                _ => {}
            }
        }
        h
    }

    #[test]
    fn same_seed_same_actions() {
        let strip = |ws: Vec<Write>| -> Vec<String> {
            ws.iter()
                .map(|w| match w {
                    // Ids are ObjectIds minted at write time; compare the rest.
                    Write::Insert { coll, doc } => {
                        let mut d = doc.clone();
                        d.remove("_id");
                        d.remove("orderId");
                        format!("{coll:?} {d}")
                    }
                    Write::Set { coll, set, .. } => format!("{coll:?} {set}"),
                    Write::Upsert { coll, doc, .. } => format!("{coll:?} {doc}"),
                })
                .collect()
        };
        assert_eq!(strip(run_steps(3, 300).1), strip(run_steps(3, 300).1));
        assert_ne!(strip(run_steps(3, 300).1), strip(run_steps(4, 300).1));
    }

    #[test]
    fn orders_walk_the_legacy_flow_in_order() {
        let (_, writes) = run_steps(11, 3000);
        let histories = order_histories(&writes);
        assert!(histories.len() > 50, "only {} orders", histories.len());
        let mut finished = 0;
        for (ty, statuses) in histories.values() {
            let flow: &[&str] = if ty == "pickup" {
                &PICKUP_FLOW
            } else {
                &DELIVERY_FLOW
            };
            // A prefix of the flow, optionally ending in cancelled.
            let (walk, cancelled) = match statuses.split_last() {
                Some((last, rest)) if last == "cancelled" => (rest, true),
                _ => (statuses.as_slice(), false),
            };
            assert!(walk.len() <= flow.len(), "{ty}: {statuses:?}");
            for (got, want) in walk.iter().zip(flow) {
                assert_eq!(got, want, "{ty}: {statuses:?}");
            }
            if cancelled {
                assert!(walk.len() <= 2, "cancelled late: {statuses:?}");
            }
            if ty == "pickup" {
                assert!(!statuses.iter().any(|s| s == "out_for_delivery"));
            }
            if statuses
                .last()
                .is_some_and(|s| s == "completed" || s == "cancelled")
            {
                finished += 1;
            }
        }
        assert!(finished > 40, "only {finished} orders finished");
        let types: HashSet<&str> = histories.values().map(|(t, _)| t.as_str()).collect();
        assert_eq!(types, HashSet::from(["pickup", "delivery"]));
    }

    #[test]
    fn live_orders_stay_bounded_and_focus_customer_always_has_one() {
        let cfg = TrafficConfig::default();
        let mut t = Traffic::new(&cfg);
        let now = DateTime::from_millis(0);
        let mut focus_gaps = 0;
        for _ in 0..5000 {
            t.step(now);
            assert!(t.live.len() <= t.max_live);
            if !t.live.iter().any(|o| o.customer == FOCUS_CUSTOMER) {
                focus_gaps += 1;
            }
        }
        // The focus order finishes now and then; a new one follows on the next order tick.
        assert!(
            focus_gaps < 1000,
            "focus customer idle for {focus_gaps} of 5000 steps"
        );
    }

    #[test]
    fn payments_succeed_fail_and_refund() {
        let (_, writes) = run_steps(5, 3000);
        let mut statuses = HashSet::new();
        for w in &writes {
            match w {
                Write::Insert {
                    coll: Coll::Payments,
                    doc,
                } => {
                    assert!(doc.get_object_id("orderId").is_ok());
                    assert!(doc.get_str("customerId").is_ok());
                    assert!(doc.get_str("storeId").is_ok());
                    statuses.insert(doc.get_str("status").unwrap().to_owned());
                }
                Write::Set {
                    coll: Coll::Payments,
                    set,
                    ..
                } => {
                    statuses.insert(set.get_str("status").unwrap().to_owned());
                }
                _ => {}
            }
        }
        for s in ["pending", "succeeded", "failed", "refunded"] {
            assert!(statuses.contains(s), "no {s} payment in {statuses:?}");
        }
    }

    #[test]
    fn settings_edits_are_public_private_and_mixed() {
        let (_, writes) = run_steps(9, 3000);
        let (mut public, mut private, mut mixed) = (0, 0, 0);
        for w in &writes {
            if let Write::Set {
                coll: Coll::Settings,
                id,
                set,
            } = w
            {
                assert!(id.as_str().is_some_and(|s| s.starts_with("settings-s")));
                let has_pub = set
                    .keys()
                    .any(|k| PUBLIC.contains(&k.as_str()) && k != "updatedAt");
                let has_priv = set.keys().any(|k| PRIVATE.contains(&k.as_str()));
                assert!(
                    set.keys()
                        .all(|k| PUBLIC.contains(&k.as_str()) || PRIVATE.contains(&k.as_str())),
                    "unexpected field in {set}"
                );
                match (has_pub, has_priv) {
                    (true, false) => public += 1,
                    (false, true) => private += 1,
                    (true, true) => mixed += 1,
                    (false, false) => panic!("empty settings edit"),
                }
            }
        }
        assert!(
            public > 5 && private > 5 && mixed > 5,
            "{public} {private} {mixed}"
        );
    }

    #[test]
    fn seed_covers_every_store_with_public_and_private_fields() {
        let mut t = Traffic::new(&TrafficConfig::default());
        let seeds = t.seed_writes(DateTime::from_millis(0));
        assert_eq!(seeds.len(), 4);
        let Some(Write::Upsert {
            coll: Coll::Users,
            doc: user,
            ..
        }) = seeds.last()
        else {
            panic!("{seeds:?}")
        };
        assert_eq!(user.get_str("_id").unwrap(), FOCUS_CUSTOMER);
        assert_eq!(user.get_i64("balance").unwrap(), OPENING_BALANCE);
        for (w, store) in seeds.iter().zip(["s1", "s2", "s3"]) {
            let Write::Upsert { doc, .. } = w else {
                panic!("{w:?}")
            };
            assert_eq!(doc.get_str("storeId").unwrap(), store);
            for k in [
                "storeBanner",
                "storeLogo",
                "aboutStory",
                "username",
                "paymentProvider",
                "taxEnabled",
                "shippingPrice",
                "customDomain",
                "warehouseCity",
            ] {
                assert!(doc.contains_key(k), "{k} missing");
            }
        }
    }

    #[test]
    fn the_focus_balance_moves_every_few_writes_and_never_goes_negative() {
        let (t, writes) = run_steps(13, 3000);
        let mut balance = OPENING_BALANCE;
        let (mut ups, mut downs) = (0, 0);
        for w in &writes {
            if let Write::Set {
                coll: Coll::Users,
                id,
                set,
            } = w
            {
                assert_eq!(id.as_str(), Some(FOCUS_CUSTOMER));
                let now = set.get_i64("balance").unwrap();
                assert!(now >= 0, "{now}");
                assert_ne!(now, balance);
                if now > balance {
                    ups += 1;
                } else {
                    downs += 1;
                }
                balance = now;
            }
        }
        assert_eq!(balance, t.balance);
        assert!(ups > 20 && downs > 20, "{ups} top-ups, {downs} spends");
    }

    #[test]
    fn principals_are_deterministic() {
        let p = demo_principals();
        assert_eq!(p.customers, ["c1", "c2", "c3", "c4"]);
        assert_eq!(p.stores, ["s1", "s2", "s3"]);
        assert_eq!(p.customers[0], FOCUS_CUSTOMER);
        assert_eq!(p.stores[0], FOCUS_STORE);
    }
}
