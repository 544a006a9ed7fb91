//! Who may join which room (design.md's rooms table), and the order-ownership lookup it needs; knows nothing of tokens or sockets.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bson::raw::{RawBsonRef, RawDocument};
use bson::{doc, Bson, Document, RawDocumentBuf};
use futures::future::BoxFuture;
use mongodb::Collection;

use crate::auth::{normalize_id, Principal};
use crate::docpath::raw_path;
use crate::room::{Room, RoomKind};

pub use crate::event::OrderOwner;

/// Whether `p` may see events of an order owned by `o` (the `order:{id}` rule of the
/// rooms table): an admin, the order's customer, or staff of one of its stores.
pub(crate) fn owns(p: &Principal, o: &OrderOwner) -> bool {
    p.is_admin
        || p.subject
            .as_deref()
            .is_some_and(|s| o.customer.as_deref() == Some(s))
        || o.stores.iter().any(|s| p.stores.contains(s))
}

/// Why an ownership lookup gave no answer (as opposed to "no such order").
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// MongoDB answered with an error or could not be reached.
    #[error("order owner lookup failed")]
    Mongo(#[source] mongodb::error::Error),
    /// No answer within `auth.order_lookup_timeout`.
    #[error("order owner lookup timed out")]
    Timeout,
}

/// Finds the owners of an order. `Ok(None)`: there is no such order.
pub trait OrderOwners: Send + Sync {
    /// Looks up `order_id` (a room id, already validated by [`Room`]) in `database`
    /// (`None`: every watched database, first found; used when only one is watched).
    fn owners<'a>(
        &'a self,
        order_id: &str,
        database: Option<&str>,
    ) -> BoxFuture<'a, Result<Option<OrderOwner>, LookupError>>;

    /// The change stream of `database` saw `order_id` owned by `owner` (`None`: deleted).
    /// A cache replaces what it holds, so a client refused or admitted by a stale answer
    /// is not for long. The default keeps nothing.
    fn observe(&self, order_id: &str, database: Option<&str>, owner: Option<&OrderOwner>) {
        let _ = (order_id, database, owner);
    }
}

/// Cache and deadline of ownership lookups (keys `auth.order_cache_ttl`,
/// `auth.order_cache_capacity`, `auth.order_lookup_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderLookupConfig {
    /// How long a found order's owners are reused. Default 10s: an order
    /// rarely changes hands, and a refused client retrying cannot hammer MongoDB.
    pub(crate) ttl: Duration,
    /// Most cached orders. Default 10000 (a few MB at most).
    pub(crate) capacity: NonZeroUsize,
    /// Deadline for one lookup. Default 2s.
    pub(crate) timeout: Duration,
}

impl Default for OrderLookupConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            capacity: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            timeout: Duration::from_secs(2),
        }
    }
}

/// "No such order" is remembered at most this long (and never longer than
/// the ttl): a customer who subscribes to an order the moment it is created
/// must not be refused for the whole ttl by a lookup that raced the insert.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// A TTL map from order id to lookup result, bounded by `capacity`.
///
/// At capacity, expired entries are purged first; if none had expired, the
/// oldest entry is evicted. Both are O(n) scans, paid only on an insert into
/// a full cache, which at n = 10 000 is tens of microseconds.
struct OwnerCache {
    ttl: Duration,
    negative_ttl: Duration,
    capacity: usize,
    map: Mutex<HashMap<String, CacheEntry>>,
}

struct CacheEntry {
    stored: Instant,
    owner: Option<OrderOwner>,
    /// Written from the change stream rather than by a lookup.
    observed: bool,
}

impl OwnerCache {
    fn new(cfg: &OrderLookupConfig) -> Self {
        Self {
            ttl: cfg.ttl,
            negative_ttl: NEGATIVE_TTL.min(cfg.ttl),
            capacity: cfg.capacity.get(),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn fresh(&self, e: &CacheEntry, now: Instant) -> bool {
        let ttl = if e.owner.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        };
        now.saturating_duration_since(e.stored) < ttl
    }

    /// `Some(result)` on a fresh hit.
    fn get(&self, id: &str, now: Instant) -> Option<Option<OrderOwner>> {
        // A poisoned lock only means another thread panicked mid-insert; the
        // map is still a valid map, so keep serving.
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(id)
            .filter(|e| self.fresh(e, now))
            .map(|e| e.owner.clone())
    }

    /// Stores what a lookup started at `asked` found, unless the stream has told us
    /// something since (a lookup racing an ownership change must not undo it).
    fn put_looked_up(&self, id: &str, owner: Option<OrderOwner>, asked: Instant) {
        let newer = {
            let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            map.get(id).is_some_and(|e| e.observed && e.stored >= asked)
        };
        if !newer {
            self.insert(id, owner, Instant::now(), false);
        }
    }

    #[cfg(test)]
    fn put(&self, id: &str, owner: Option<OrderOwner>, now: Instant) {
        self.insert(id, owner, now, false);
    }

    fn insert(&self, id: &str, owner: Option<OrderOwner>, now: Instant, observed: bool) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.capacity && !map.contains_key(id) {
            map.retain(|_, e| self.fresh(e, now));
            if map.len() >= self.capacity {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, e)| e.stored)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            id.to_owned(),
            CacheEntry {
                stored: now,
                owner,
                observed,
            },
        );
    }

    /// What the change stream says, replacing any entry. Only orders already cached are
    /// updated: the stream sees every order, the cache holds only those someone asked for.
    fn observe(&self, id: &str, owner: Option<&OrderOwner>, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get_mut(id) {
            // Copied only for the orders someone asked about: the stream passes every one.
            *e = CacheEntry {
                stored: now,
                owner: owner.cloned(),
                observed: true,
            };
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Wraps any [`OrderOwners`] with the TTL cache: found and not-found results
/// are cached briefly, errors never (the next subscribe retries).
pub(crate) struct CachedOrderOwners<O> {
    inner: O,
    cache: OwnerCache,
}

impl<O: OrderOwners> CachedOrderOwners<O> {
    /// Caches `inner` per `cfg.ttl` and `cfg.capacity`.
    pub(crate) fn new(inner: O, cfg: &OrderLookupConfig) -> Self {
        Self {
            inner,
            cache: OwnerCache::new(cfg),
        }
    }
}

/// The cache key of an order in a database: ids may repeat across databases.
fn cache_key(order_id: &str, database: Option<&str>) -> String {
    match database {
        Some(db) => format!("{db}\u{0}{order_id}"),
        None => order_id.to_owned(),
    }
}

impl<O: OrderOwners> OrderOwners for CachedOrderOwners<O> {
    fn owners<'a>(
        &'a self,
        order_id: &str,
        database: Option<&str>,
    ) -> BoxFuture<'a, Result<Option<OrderOwner>, LookupError>> {
        let id = order_id.to_owned();
        let db = database.map(str::to_owned);
        Box::pin(async move {
            let key = cache_key(&id, db.as_deref());
            let asked = Instant::now();
            if let Some(hit) = self.cache.get(&key, asked) {
                return Ok(hit);
            }
            let found = self.inner.owners(&id, db.as_deref()).await?;
            self.cache.put_looked_up(&key, found.clone(), asked);
            Ok(found)
        })
    }

    fn observe(&self, order_id: &str, database: Option<&str>, owner: Option<&OrderOwner>) {
        // Keyed as lookups are: by id alone with one database (the mapper then passes
        // none), by database and id with several.
        let key = match database {
            Some(_) => std::borrow::Cow::Owned(cache_key(order_id, database)),
            None => std::borrow::Cow::Borrowed(order_id),
        };
        self.cache.observe(&key, owner, Instant::now());
    }
}

/// Looks order owners up in MongoDB: one `find_one` by `_id` per orders
/// collection (one per watched database, tried in order), projected to the
/// owner fields only. Uncached; wrap it in [`CachedOrderOwners`].
pub(crate) struct MongoOrderOwners {
    collections: Vec<Collection<Document>>,
    customer_paths: Vec<String>,
    store_paths: Vec<String>,
    projection: Document,
    timeout: Duration,
}

impl MongoOrderOwners {
    /// `customer_paths` (e.g. `["customerId"]`) and `store_paths` (e.g.
    /// `["storeId", "sellerId"]`) are dotted field paths in the order
    /// document with `[fields]` semantics: in each list the first path that
    /// yields an id wins (a store path may hold an array of ids). Pass the
    /// same lists routing uses, so that who may join `order:{id}` matches
    /// whose rooms its events are sent to.
    pub(crate) fn new(
        collections: Vec<Collection<Document>>,
        customer_paths: Vec<String>,
        store_paths: Vec<String>,
        timeout: Duration,
    ) -> Self {
        let projection = owner_projection(&customer_paths, &store_paths);
        Self {
            collections,
            customer_paths,
            store_paths,
            projection,
            timeout,
        }
    }

    async fn lookup(
        &self,
        id: &str,
        database: Option<&str>,
    ) -> Result<Option<OrderOwner>, LookupError> {
        let filter = order_filter(id);
        // A tenant's order is looked up in its own database only: the same id in
        // another tenant's database is another order.
        let colls = self
            .collections
            .iter()
            .filter(|c| database.is_none_or(|d| c.namespace().db == d));
        for coll in colls {
            // Read in place, by the same rule the change stream reads its documents with.
            let found = coll
                .clone_with_type::<RawDocumentBuf>()
                .find_one(filter.clone())
                .projection(self.projection.clone())
                .await
                .map_err(LookupError::Mongo)?;
            if let Some(doc) = found {
                return Ok(Some(extract_owner(
                    &doc,
                    &self.customer_paths,
                    &self.store_paths,
                )));
            }
        }
        Ok(None)
    }
}

impl OrderOwners for MongoOrderOwners {
    fn owners<'a>(
        &'a self,
        order_id: &str,
        database: Option<&str>,
    ) -> BoxFuture<'a, Result<Option<OrderOwner>, LookupError>> {
        let id = order_id.to_owned();
        let db = database.map(str::to_owned);
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.lookup(&id, db.as_deref()))
                .await
                .map_err(|_| LookupError::Timeout)?
        })
    }
}

/// `_id` may be an ObjectId, a string, or a number depending on the app;
/// one `$in` covers every reading of the room id in one round trip.
fn order_filter(id: &str) -> Document {
    let mut candidates = vec![Bson::String(id.to_owned())];
    if id.len() == 24 {
        if let Ok(oid) = bson::oid::ObjectId::parse_str(id) {
            candidates.push(Bson::ObjectId(oid));
        }
    }
    if let Ok(n) = id.parse::<i64>() {
        candidates.push(Bson::Int64(n));
    }
    if candidates.len() == 1 {
        doc! { "_id": id }
    } else {
        doc! { "_id": { "$in": candidates } }
    }
}

/// Only the owner fields leave the server. A path under another listed path
/// is dropped (MongoDB refuses overlapping projections).
fn owner_projection(customer_paths: &[String], store_paths: &[String]) -> Document {
    let all: Vec<&str> = customer_paths
        .iter()
        .chain(store_paths)
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .collect();
    let mut proj = Document::new();
    for p in &all {
        let covered = all
            .iter()
            .any(|q| q != p && p.strip_prefix(q).is_some_and(|rest| rest.starts_with('.')));
        if !covered {
            proj.insert(*p, 1);
        }
    }
    if !all.iter().any(|p| *p == "_id" || p.starts_with("_id.")) {
        proj.insert("_id", 0);
    }
    proj
}

/// An id as routing names rooms: ObjectId hex, a non-empty string, or an integer.
fn bson_id(b: RawBsonRef<'_>) -> Option<String> {
    match b {
        RawBsonRef::ObjectId(oid) => Some(oid.to_hex()),
        RawBsonRef::String(s) if !s.is_empty() => Some(normalize_id(s)),
        RawBsonRef::Int32(n) => Some(n.to_string()),
        RawBsonRef::Int64(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The ids at the first of `paths` that yields any (arrays give several).
fn first_ids(doc: &RawDocument, paths: &[String]) -> Vec<String> {
    for path in paths {
        let mut ids: Vec<String> = match raw_path(doc, path) {
            Some(RawBsonRef::Array(items)) => items
                .into_iter()
                .map_while(Result::ok)
                .filter_map(bson_id)
                .collect(),
            Some(b) => bson_id(b).into_iter().collect(),
            None => Vec::new(),
        };
        if ids.len() > 1 {
            let mut seen = std::collections::HashSet::new();
            ids.retain(|id| seen.insert(id.clone()));
        }
        if !ids.is_empty() {
            return ids;
        }
    }
    Vec::new()
}

/// The owners an order document names, by the `[fields]` paths: the one rule the
/// ownership lookup and the change stream both use.
pub(crate) fn extract_owner(
    doc: &RawDocument,
    customer_paths: &[String],
    store_paths: &[String],
) -> OrderOwner {
    OrderOwner {
        // A customer is one person: an array here is not an owner.
        customer: customer_paths
            .iter()
            .find_map(|p| raw_path(doc, p).and_then(bson_id)),
        stores: first_ids(doc, store_paths),
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Denied {
    /// `forbidden` (not yours), `unavailable` (could not check; retry later)
    /// or `unauthenticated` (this room needs a token).
    pub(crate) code: &'static str,
    /// Human-readable, lowercase; never says whether an order exists.
    pub(crate) message: String,
}

impl Denied {
    fn forbidden(message: &str) -> Self {
        Self {
            code: "forbidden",
            message: message.to_owned(),
        }
    }

    fn unauthenticated() -> Self {
        Self {
            code: "unauthenticated",
            message: "this room needs an authenticated connection".to_owned(),
        }
    }

    fn unavailable() -> Self {
        Self {
            code: "unavailable",
            message: "order ownership could not be checked; retry later".to_owned(),
        }
    }
}

/// Applies the rooms table to a principal.
pub struct Authorizer {
    owners: Arc<dyn OrderOwners>,
    allow_anonymous_storefront: bool,
}

impl Authorizer {
    /// `allow_anonymous_storefront` comes from `auth.allow_anonymous_storefront`.
    pub fn new(owners: Arc<dyn OrderOwners>, allow_anonymous_storefront: bool) -> Self {
        Self {
            owners,
            allow_anonymous_storefront,
        }
    }

    /// Decides whether `p` may join `room`:
    ///
    /// | room | allowed when |
    /// |---|---|
    /// | any | `p.is_admin` |
    /// | `customer:{id}` | id == subject |
    /// | `store:{id}` | id ∈ `p.stores` |
    /// | `order:{id}` | MongoDB says the order's customer is the subject or one of its stores is in `p.stores` |
    /// | `storefront:{id}` | authenticated, or anonymous when configured |
    /// | `admin` | never for non-admins |
    ///
    /// A failed lookup refuses with `unavailable`: we never let a client in
    /// because we could not check.
    pub(crate) async fn may_join(&self, p: &Principal, room: &Room) -> Result<(), Denied> {
        if p.is_admin {
            return Ok(());
        }
        let Some(subject) = p.subject.as_deref() else {
            return match room.kind() {
                RoomKind::Storefront if self.allow_anonymous_storefront => Ok(()),
                _ => Err(Denied::unauthenticated()),
            };
        };
        let id = room.id();
        match room.kind() {
            RoomKind::Storefront => Ok(()),
            RoomKind::Admin => Err(Denied::forbidden("the admin room is for admins")),
            RoomKind::Customer if id == subject => Ok(()),
            RoomKind::Customer => Err(Denied::forbidden("not your customer room")),
            RoomKind::Store if p.stores.iter().any(|s| s == id) => Ok(()),
            RoomKind::Store => Err(Denied::forbidden("not one of your stores")),
            RoomKind::Order => match self.owners.owners(id, p.database.as_deref()).await {
                Ok(Some(o)) if owns(p, &o) => Ok(()),
                // Same answer for "not yours" and "no such order", so order
                // ids cannot be probed.
                Ok(_) => Err(Denied::forbidden("order not found or not yours")),
                Err(e) => {
                    tracing::warn!(error = %e, "order owner lookup failed");
                    Err(Denied::unavailable())
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// In-memory owners; `fail` makes every lookup an error. Counts calls.
    #[derive(Default)]
    struct Fake {
        orders: HashMap<String, OrderOwner>,
        fail: std::sync::atomic::AtomicBool,
        calls: AtomicUsize,
    }

    impl OrderOwners for Fake {
        fn owners<'a>(
            &'a self,
            order_id: &str,
            _database: Option<&str>,
        ) -> BoxFuture<'a, Result<Option<OrderOwner>, LookupError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let r = if self.fail.load(Ordering::SeqCst) {
                Err(LookupError::Timeout)
            } else {
                Ok(self.orders.get(order_id).cloned())
            };
            Box::pin(async move { r })
        }
    }

    impl OrderOwners for Arc<Fake> {
        fn owners<'a>(
            &'a self,
            order_id: &str,
            database: Option<&str>,
        ) -> BoxFuture<'a, Result<Option<OrderOwner>, LookupError>> {
            (**self).owners(order_id, database)
        }
    }

    fn fake() -> Fake {
        let mut orders = HashMap::new();
        orders.insert(
            "o1".to_owned(),
            OrderOwner {
                customer: Some("alice".into()),
                stores: vec!["s1".into()],
            },
        );
        orders.insert(
            "o2".to_owned(),
            OrderOwner {
                customer: Some("bob".into()),
                stores: vec!["s2".into(), "s3".into()],
            },
        );
        Fake {
            orders,
            ..Fake::default()
        }
    }

    fn customer(sub: &str) -> Principal {
        Principal {
            subject: Some(sub.into()),
            ..Principal::anonymous()
        }
    }

    fn staff(sub: &str, stores: &[&str]) -> Principal {
        Principal {
            subject: Some(sub.into()),
            role: Some("store".into()),
            stores: stores.iter().map(|s| s.to_string()).collect(),
            is_store_staff: true,
            ..Principal::anonymous()
        }
    }

    fn admin() -> Principal {
        Principal {
            subject: Some("root".into()),
            role: Some("admin".into()),
            is_admin: true,
            ..Principal::anonymous()
        }
    }

    fn room(s: &str) -> Room {
        s.parse().unwrap()
    }

    async fn code(a: &Authorizer, p: &Principal, r: &str) -> Option<&'static str> {
        a.may_join(p, &room(r)).await.err().map(|d| d.code)
    }

    #[tokio::test]
    async fn the_rooms_table() {
        let a = Authorizer::new(Arc::new(fake()), false);
        let alice = customer("alice");
        let s1 = staff("carol", &["s1"]);
        let s3 = staff("dave", &["s3"]);

        assert_eq!(code(&a, &alice, "customer:alice").await, None);
        assert_eq!(code(&a, &alice, "customer:bob").await, Some("forbidden"));
        assert_eq!(code(&a, &alice, "store:s1").await, Some("forbidden"));
        assert_eq!(code(&a, &alice, "order:o1").await, None);
        assert_eq!(code(&a, &alice, "order:o2").await, Some("forbidden"));
        assert_eq!(code(&a, &alice, "order:missing").await, Some("forbidden"));
        assert_eq!(code(&a, &alice, "storefront:s2").await, None);
        assert_eq!(code(&a, &alice, "admin").await, Some("forbidden"));

        assert_eq!(code(&a, &s1, "store:s1").await, None);
        assert_eq!(code(&a, &s1, "store:s2").await, Some("forbidden"));
        assert_eq!(code(&a, &s1, "order:o1").await, None);
        assert_eq!(code(&a, &s1, "order:o2").await, Some("forbidden"));
        assert_eq!(code(&a, &s1, "customer:alice").await, Some("forbidden"));
        assert_eq!(code(&a, &s1, "customer:carol").await, None);
        // The second of an order's stores is an owner too.
        assert_eq!(code(&a, &s3, "order:o2").await, None);

        let root = admin();
        for r in [
            "admin",
            "customer:x",
            "store:x",
            "order:o2",
            "order:missing",
            "storefront:x",
        ] {
            assert_eq!(code(&a, &root, r).await, None, "{r}");
        }
    }

    #[tokio::test]
    async fn anonymous_storefront_is_opt_in() {
        let anon = Principal::anonymous();
        let closed = Authorizer::new(Arc::new(fake()), false);
        let open = Authorizer::new(Arc::new(fake()), true);
        assert_eq!(
            code(&closed, &anon, "storefront:s1").await,
            Some("unauthenticated")
        );
        assert_eq!(code(&open, &anon, "storefront:s1").await, None);
        for r in ["customer:alice", "store:s1", "order:o1", "admin"] {
            assert_eq!(code(&open, &anon, r).await, Some("unauthenticated"), "{r}");
        }
    }

    #[tokio::test]
    async fn lookup_failure_refuses_as_unavailable() {
        let f = fake();
        f.fail.store(true, Ordering::SeqCst);
        let a = Authorizer::new(Arc::new(f), false);
        assert_eq!(
            code(&a, &customer("alice"), "order:o1").await,
            Some("unavailable")
        );
        // Admins do not need the lookup.
        assert_eq!(code(&a, &admin(), "order:o1").await, None);
    }

    #[tokio::test]
    async fn cache_hits_and_does_not_cache_errors() {
        let f = Arc::new(fake());
        let cfg = OrderLookupConfig {
            ttl: Duration::from_secs(3600),
            ..OrderLookupConfig::default()
        };
        let cached = CachedOrderOwners::new(f.clone(), &cfg);
        assert!(cached.owners("o1", None).await.unwrap().is_some());
        assert!(cached.owners("o1", None).await.unwrap().is_some());
        assert_eq!(f.calls.load(Ordering::SeqCst), 1);

        f.fail.store(true, Ordering::SeqCst);
        assert!(cached.owners("o2", None).await.is_err());
        f.fail.store(false, Ordering::SeqCst);
        assert_eq!(
            cached
                .owners("o2", None)
                .await
                .unwrap()
                .unwrap()
                .customer
                .as_deref(),
            Some("bob")
        );
        assert_eq!(f.calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn cache_expiry_and_bound() {
        let cfg = OrderLookupConfig {
            ttl: Duration::from_secs(10),
            capacity: NonZeroUsize::new(2).unwrap(),
            timeout: Duration::from_secs(1),
        };
        let c = OwnerCache::new(&cfg);
        let t0 = Instant::now();
        let owner = Some(OrderOwner::default());
        c.put("a", owner.clone(), t0);
        c.put("missing", None, t0);
        assert_eq!(c.get("a", t0 + Duration::from_secs(9)), Some(owner.clone()));
        assert_eq!(c.get("a", t0 + Duration::from_secs(10)), None);
        // Negative results live for NEGATIVE_TTL only.
        assert_eq!(c.get("missing", t0), Some(None));
        assert_eq!(c.get("missing", t0 + NEGATIVE_TTL), None);

        // Full: the expired negative entry is purged to make room.
        c.put("b", owner.clone(), t0 + Duration::from_secs(2));
        assert_eq!(c.len(), 2);
        assert!(c.get("a", t0 + Duration::from_secs(2)).is_some());
        // Full with nothing expired: the oldest ("a") goes.
        c.put("c", owner.clone(), t0 + Duration::from_secs(3));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a", t0 + Duration::from_secs(3)), None);
        assert!(c.get("b", t0 + Duration::from_secs(3)).is_some());
        assert!(c.get("c", t0 + Duration::from_secs(3)).is_some());
    }

    #[test]
    fn the_stream_replaces_cached_owners_and_a_racing_lookup_cannot_undo_it() {
        let c = OwnerCache::new(&OrderLookupConfig::default());
        let a = Some(OrderOwner {
            customer: Some("a".into()),
            stores: vec!["s1".into()],
        });
        let b = Some(OrderOwner {
            customer: Some("b".into()),
            stores: vec!["s2".into()],
        });
        let t0 = Instant::now();
        // Orders nobody asked about are not cached from the stream.
        c.observe("x", b.as_ref(), t0);
        assert_eq!(c.len(), 0);
        c.put("o", a.clone(), t0);
        c.observe("o", b.as_ref(), t0);
        assert_eq!(c.get("o", t0), Some(b.clone()));
        // A lookup that started before the stream spoke answers with what it read
        // (A), but the cache keeps the stream's newer word.
        c.put_looked_up("o", a.clone(), t0 - Duration::from_millis(1));
        assert_eq!(c.get("o", Instant::now()), Some(b.clone()));
        // A lookup started after it is taken.
        c.put_looked_up("o", a.clone(), Instant::now());
        assert_eq!(c.get("o", Instant::now()), Some(a));
        // A delete is a negative entry.
        c.observe("o", None, Instant::now());
        assert_eq!(c.get("o", Instant::now()), Some(None));
    }

    #[test]
    fn owns_follows_the_rooms_table() {
        let o = OrderOwner {
            customer: Some("c1".into()),
            stores: vec!["s1".into(), "s2".into()],
        };
        let p = |sub: &str, stores: &[&str], admin: bool| Principal {
            subject: Some(sub.into()),
            stores: stores.iter().map(|s| s.to_string()).collect(),
            role: None,
            is_admin: admin,
            is_store_staff: !stores.is_empty(),
            expires_at: None,
            database: None,
        };
        assert!(owns(&p("c1", &[], false), &o));
        assert!(owns(&p("staff", &["s2"], false), &o));
        assert!(owns(&p("root", &[], true), &o));
        assert!(!owns(&p("c2", &["s3"], false), &o));
        assert!(!owns(&p("", &[], false), &OrderOwner::default()));
    }

    #[test]
    fn filter_tries_every_reading_of_the_id() {
        let hex = "65f0a1b2c3d4e5f601234567";
        let f = order_filter(hex);
        let oid = bson::oid::ObjectId::parse_str(hex).unwrap();
        assert_eq!(f, doc! { "_id": { "$in": [hex, oid] } });
        assert_eq!(
            order_filter("1042"),
            doc! { "_id": { "$in": ["1042", 1042_i64] } }
        );
        assert_eq!(order_filter("ord-7"), doc! { "_id": "ord-7" });
    }

    #[test]
    fn projection_only_owner_fields() {
        let p = owner_projection(
            &["customer.id".into(), "buyerId".into()],
            &["storeId".into(), "customer".into(), "seller.ids".into()],
        );
        assert_eq!(
            p,
            doc! { "buyerId": 1, "storeId": 1, "customer": 1, "seller.ids": 1, "_id": 0 }
        );
    }

    #[test]
    fn owner_extraction_first_present_path_wins() {
        let cust = bson::oid::ObjectId::parse_str("65f0a1b2c3d4e5f601234567").unwrap();
        let paths = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let d = doc! {
            "userId": null,
            "customerId": cust,
            "storeId": "",
            "seller": { "ids": [7_i32, "s9", "", true, 7_i64] },
            "sellerId": "never-reached",
        };
        let d = bson::RawDocumentBuf::from_document(&d).unwrap();
        let o = extract_owner(
            &d,
            &paths(&["userId", "customerId"]),
            &paths(&["storeId", "seller.ids", "sellerId"]),
        );
        assert_eq!(o.customer.as_deref(), Some("65f0a1b2c3d4e5f601234567"));
        assert_eq!(o.stores, vec!["7", "s9"]);

        let upper = doc! { "storeId": "AAAAAAAAAAAAAAAAAAAAAAAA", "sellerId": "s2" };
        let upper = bson::RawDocumentBuf::from_document(&upper).unwrap();
        let o = extract_owner(
            &upper,
            &paths(&["customerId"]),
            &paths(&["storeId", "sellerId"]),
        );
        assert_eq!(o.customer, None);
        assert_eq!(o.stores, vec!["aaaaaaaaaaaaaaaaaaaaaaaa"]);

        let empty = extract_owner(
            &bson::RawDocumentBuf::from_document(&doc! { "customerId": ["a", "b"] }).unwrap(),
            &paths(&["customerId"]),
            &paths(&["storeId"]),
        );
        assert_eq!(empty, OrderOwner::default());
    }
    /// A MongoDB that never answers: the lookup ends at our deadline or the
    /// driver's server-selection timeout, and the join is refused as
    /// `unavailable`, never allowed.
    #[tokio::test]
    async fn unreachable_mongodb_is_unavailable_not_allowed() {
        // A port nobody listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for (selection_ms, deadline) in [
            (60_000, Duration::from_millis(200)),
            (50, Duration::from_secs(30)),
        ] {
            let uri = format!(
                "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS={selection_ms}"
            );
            let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
            let orders = client.database("shop").collection::<Document>("orders");
            let mongo = MongoOrderOwners::new(
                vec![orders],
                vec!["customerId".into()],
                vec!["storeId".into()],
                deadline,
            );
            let err = mongo.owners("o1", None).await.unwrap_err();
            if selection_ms == 50 {
                assert!(matches!(err, LookupError::Mongo(_)), "{err:?}");
            } else {
                assert!(matches!(err, LookupError::Timeout), "{err:?}");
            }
            let a = Authorizer::new(Arc::new(mongo), false);
            assert_eq!(
                code(&a, &customer("alice"), "order:o1").await,
                Some("unavailable")
            );
        }
    }
}
