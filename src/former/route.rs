//! The built-in router as it was before orders, payments and settings became presets of the declared-stream engine: kept only as the test oracle (`former::prop`), with its own tests and the hostile-change properties.

use std::collections::BTreeMap;

use serde_json::Value;

use super::normalize::{CollectionKind, DomainEvent, EventName};
use crate::config::{Allowlists, RoutingConfig, SettingsSection};
use crate::event::{Delivery, Event, RoutedEvent};
use crate::room::{Room, RoomKind};
use bson::Document;
use serde_json::Map;

use crate::docpath::get_path;
use crate::event::StatusInfo;
use crate::route::{bson_to_json, visible_changes};

/// A route that was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteIssue {
    /// The id for this room kind is not a valid room id (empty, too long, odd characters).
    InvalidRoomId {
        /// The room kind that was skipped.
        kind: RoomKind,
    },
}

impl RouteIssue {
    /// A bounded label for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            RouteIssue::InvalidRoomId { .. } => "invalid_room_id",
        }
    }
}

/// Decides rooms and payloads. Immutable; share it freely.
#[derive(Debug, Clone)]
pub(crate) struct Router {
    orders: Allowlists,
    payments: Allowlists,
    /// Section name → definition. Visibility is decided from here, not from the
    /// event, so a private section cannot reach a storefront whatever the event says.
    sections: BTreeMap<String, SettingsSection>,
}

impl Router {
    /// Builds a router from `[routing]`.
    pub(crate) fn new(cfg: &RoutingConfig) -> Self {
        Self {
            orders: cfg.orders.clone(),
            payments: cfg.payments.clone(),
            sections: cfg
                .settings_sections
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
        }
    }

    /// Addresses an event to its rooms with one payload per room; `None` when no room remains.
    pub(crate) fn route(&self, ev: &DomainEvent) -> (Option<RoutedEvent>, Vec<RouteIssue>) {
        let mut issues = Vec::new();
        let deliveries = match ev.collection {
            CollectionKind::Orders => self.record(ev, &self.orders, &mut issues),
            CollectionKind::Payments => self.record(ev, &self.payments, &mut issues),
            CollectionKind::Settings => self.settings(ev, &mut issues),
        };
        if deliveries.is_empty() {
            return (None, issues);
        }
        let routed = RoutedEvent {
            // The mapper adds it: ownership uses the `[fields]` paths, not the allowlists.
            owner: None,
            database: None,
            event: Event {
                id: ev.id.clone(),
                name: ev.name.as_str().into(),
                ts_ms: ev.ts_ms,
            },
            deliveries,
        };
        (Some(routed), issues)
    }

    fn record(
        &self,
        ev: &DomainEvent,
        lists: &Allowlists,
        issues: &mut Vec<RouteIssue>,
    ) -> Vec<Delivery> {
        let audiences = [
            (
                RoomKind::Customer,
                ev.keys.customer.as_deref(),
                &lists.customer,
            ),
            (RoomKind::Store, ev.keys.store.as_deref(), &lists.store),
            (RoomKind::Order, ev.keys.order.as_deref(), &lists.order),
            (RoomKind::Admin, Some(""), &lists.admin),
        ];
        // Plain updates that touch nothing an audience may see are not news to it.
        let plain_update = matches!(ev.name, EventName::OrderUpdated | EventName::PaymentUpdated);
        let mut out = Vec::new();
        for (kind, id, allow) in audiences {
            // A missing id was already reported by normalization.
            let Some(id) = id else { continue };
            let Some(room) = room(kind, id, issues) else {
                continue;
            };
            let visible = visible_changes(&ev.changed_fields, allow);
            if plain_update && visible.is_empty() {
                continue;
            }
            let mut data = project(&ev.document, allow);
            if let Some(order) = &ev.keys.order {
                data.insert("orderId".into(), Value::String(order.clone()));
            }
            if ev.collection == CollectionKind::Payments {
                if let Some(id) = &ev.doc_id {
                    data.insert("paymentId".into(), Value::String(id.clone()));
                }
            }
            if let Some(st) = &ev.status {
                insert_status(&mut data, st, ev.collection == CollectionKind::Orders);
            }
            if !ev.changed_fields.is_empty() {
                data.insert(
                    "changedFields".into(),
                    Value::Array(
                        visible
                            .into_iter()
                            .map(|v| Value::String(v.to_owned()))
                            .collect(),
                    ),
                );
            }
            out.push(Delivery {
                room,
                data: crate::event::Payload::from_value(&Value::Object(data)),
            });
        }
        out
    }

    fn settings(&self, ev: &DomainEvent, issues: &mut Vec<RouteIssue>) -> Vec<Delivery> {
        // Only sections this router knows; publicity from its own config.
        let known: Vec<(&SettingsSection, &[String])> = ev
            .sections
            .iter()
            .filter_map(|c| {
                let def = self.sections.get(&c.name)?;
                Some((def, c.changed_fields.as_slice()))
            })
            .collect();
        let public: Vec<(&SettingsSection, &[String])> =
            known.iter().copied().filter(|(d, _)| d.public).collect();

        let mut out = Vec::new();
        let store = ev.keys.store.as_deref();
        let targets = [
            (RoomKind::Store, store, &known),
            (RoomKind::Storefront, store, &public),
            (RoomKind::Admin, Some(""), &known),
        ];
        for (kind, id, sections) in targets {
            let Some(id) = id else { continue };
            if sections.is_empty() {
                continue;
            }
            let Some(room) = room(kind, id, issues) else {
                continue;
            };
            let fields: Vec<String> = sections
                .iter()
                .flat_map(|(d, _)| d.fields.iter().cloned())
                .collect();
            let mut data = project(&ev.document, &fields);
            if let Some(s) = store {
                data.insert("storeId".into(), Value::String(s.to_owned()));
            }
            data.insert(
                "sections".into(),
                Value::Array(
                    sections
                        .iter()
                        .map(|(d, _)| Value::String(d.name.clone()))
                        .collect(),
                ),
            );
            // Only the configured field names of visible sections, never the raw paths.
            data.insert(
                "changedFields".into(),
                Value::Array(
                    sections
                        .iter()
                        .flat_map(|(d, changed)| {
                            changed
                                .iter()
                                .filter(|f| d.fields.contains(f))
                                .map(|f| Value::String(f.clone()))
                        })
                        .collect(),
                ),
            );
            out.push(Delivery {
                room,
                data: crate::event::Payload::from_value(&Value::Object(data)),
            });
        }
        out
    }
}

fn room(kind: RoomKind, id: &str, issues: &mut Vec<RouteIssue>) -> Option<Room> {
    match Room::new(kind, id) {
        Ok(r) => Some(r),
        Err(_) => {
            issues.push(RouteIssue::InvalidRoomId { kind });
            None
        }
    }
}

// The projection into `Value` trees the payload writer (`payload`) replaced.

/// A status's event fields (`status`, `rawStatus`, `previousStatus`, `unknown`, and for
/// orders `progress`), the same for every collection that has a status table.
pub(crate) fn insert_status(data: &mut Map<String, Value>, st: &StatusInfo, progress: bool) {
    data.insert("status".into(), Value::String(st.status.to_string()));
    data.insert("rawStatus".into(), Value::String(st.raw.clone()));
    data.insert(
        "previousStatus".into(),
        st.previous
            .as_deref()
            .map_or(Value::Null, |p| Value::String(p.to_owned())),
    );
    if progress {
        data.insert(
            "progress".into(),
            st.progress.map_or(Value::Null, Value::from),
        );
    }
    data.insert("unknown".into(), Value::Bool(st.unknown));
}

/// The allowlisted paths of `doc` as a JSON object (nested for dotted paths).
pub(crate) fn project(doc: &Document, allow: &[String]) -> Map<String, Value> {
    project_paths(doc, allow.iter().map(String::as_str))
}

/// [`project`] over any sequence of paths (settings project several sections' lists).
pub(crate) fn project_paths<'a>(
    doc: &Document,
    paths: impl IntoIterator<Item = &'a str>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for path in paths {
        let Some(v) = get_path(doc, path) else {
            continue;
        };
        let segs: Vec<&str> = path.split('.').collect();
        insert_path(&mut out, &segs, bson_to_json(v));
    }
    out
}

/// Inserts `value` at `segs`, creating objects; an ancestor already included whole wins.
fn insert_path(map: &mut Map<String, Value>, segs: &[&str], value: Value) {
    match segs {
        [] => {}
        [last] => {
            map.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = map
                .entry((*first).to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = entry {
                insert_path(m, rest, value);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {

    #[test]
    fn projection_and_json() {
        let d = doc! {"a": {"b": 1, "c": 2}, "x": f64::NAN, "bin": Binary{subtype: BinarySubtype::Generic, bytes: vec![1]}, "dec": "1"};
        let p = project(
            &d,
            &["a.b".into(), "x".into(), "bin".into(), "missing".into()],
        );
        assert_eq!(
            Value::Object(p),
            serde_json::json!({"a": {"b": 1}, "x": null, "bin": null})
        );
        let mut deep = Bson::Int32(1);
        for _ in 0..200 {
            deep = Bson::Document(doc! {"d": deep});
        }
        let _ = bson_to_json(&deep);
    }

    use super::super::normalize::Normalizer;
    use super::*;
    use crate::config::Config;
    use crate::docpath::get_path;
    use crate::former::shared::id_string;
    use crate::normalize::testing::change;
    use crate::route::EVENT_FIELDS;
    use bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary};
    use bson::{Bson, Document};
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn cfg() -> Config {
        crate::config::test_config("", "t").unwrap()
    }

    fn rooms(r: &RoutedEvent) -> Vec<String> {
        r.deliveries.iter().map(|d| d.room.to_string()).collect()
    }

    fn route_one(n: &mut Normalizer, router: &Router, d: &Document) -> RoutedEvent {
        let out = n.normalize(d);
        assert_eq!(out.events.len(), 1, "{out:?}");
        let (r, issues) = router.route(&out.events[0]);
        assert!(issues.is_empty(), "{issues:?}");
        r.unwrap()
    }

    #[test]
    fn order_rooms_and_payloads() {
        let c = cfg();
        let (mut n, router) = (Normalizer::new(&c), Router::new(&c.routing));
        let oid = ObjectId::new();
        let d = change(
            "insert",
            "orders",
            Bson::ObjectId(oid),
            Some(doc! {
                "_id": oid, "customerId": "c1", "storeId": "s1", "status": "new",
                "orderNumber": "A-1", "total": 12.5, "customerPhone": "555", "paymentIntent": "pi_secret",
                "notes": "ring twice", "createdAt": bson::DateTime::from_millis(0),
            }),
        );
        let r = route_one(&mut n, &router, &d);
        assert_eq!(&*r.event.name, "order:created");
        assert_eq!(r.event.ts_ms, 1_700_000_000_000);
        assert_eq!(
            rooms(&r),
            [
                "customer:c1",
                "store:s1",
                &format!("order:{}", oid.to_hex()),
                "admin"
            ]
        );
        let customer = &r.deliveries[0].data.value();
        assert_eq!(customer["_id"], oid.to_hex());
        assert_eq!(customer["status"], "pending");
        assert_eq!(customer["rawStatus"], "new");
        assert_eq!(customer["progress"], 0);
        assert_eq!(customer["unknown"], false);
        assert_eq!(customer["createdAt"], "1970-01-01T00:00:00Z");
        assert!(customer.get("notes").is_none());
        assert!(customer.get("customerPhone").is_none());
        assert!(customer.get("paymentIntent").is_none());
        let store = &r.deliveries[1].data.value();
        assert_eq!(store["notes"], "ring twice");
        assert!(store.get("paymentIntent").is_none());
    }

    #[test]
    fn updates_invisible_to_an_audience_are_not_sent_to_it() {
        let c = cfg();
        let (mut n, router) = (Normalizer::new(&c), Router::new(&c.routing));
        let full = doc! {"customerId": "c1", "storeId": "s1", "status": "accepted", "notes": "n", "internal": 1};
        let mut upd = change(
            "update",
            "orders",
            Bson::String("o1".into()),
            Some(full.clone()),
        );
        upd.insert("updateDescription", doc! {"updatedFields": {"notes": "n"}});
        let r = route_one(&mut n, &router, &upd);
        assert_eq!(&*r.event.name, "order:updated");
        // notes is store-only: customer and order rooms hear nothing.
        assert_eq!(rooms(&r), ["store:s1", "admin"]);
        assert_eq!(
            r.deliveries[0].data.value()["changedFields"],
            serde_json::json!(["notes"])
        );

        let mut upd = change("update", "orders", Bson::String("o1".into()), Some(full));
        upd.insert("updateDescription", doc! {"updatedFields": {"internal": 1}});
        let out = n.normalize(&upd);
        assert_eq!(router.route(&out.events[0]), (None, vec![]));
    }

    #[test]
    fn settings_visibility() {
        let c = cfg();
        let (mut n, router) = (Normalizer::new(&c), Router::new(&c.routing));
        let full = doc! {"storeId": "s1", "storeLogo": "l.png", "taxEnabled": true, "paymentProvider": "stripe", "secretKey": "sk"};
        let mut upd = change("update", "settings", Bson::Int32(1), Some(full.clone()));
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"storeLogo": "l.png", "taxEnabled": true}},
        );
        let r = route_one(&mut n, &router, &upd);
        assert_eq!(rooms(&r), ["store:s1", "storefront:s1", "admin"]);
        let front = &r.deliveries[1].data.value();
        assert_eq!(
            *front,
            serde_json::json!({"storeId": "s1", "sections": ["branding"], "changedFields": ["storeLogo"], "storeLogo": "l.png"})
        );
        let store = &r.deliveries[0].data.value();
        assert_eq!(
            store["sections"],
            serde_json::json!(["branding", "tax_settings"])
        );
        assert_eq!(store["taxEnabled"], true);
        assert!(store.get("secretKey").is_none());

        // Only private sections changed: no storefront delivery at all.
        let mut upd = change("update", "settings", Bson::Int32(1), Some(full));
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"paymentProvider": "x"}},
        );
        let r = route_one(&mut n, &router, &upd);
        assert_eq!(rooms(&r), ["store:s1", "admin"]);
    }

    #[test]
    fn invalid_room_ids_skip_only_that_route() {
        let c = cfg();
        let (mut n, router) = (Normalizer::new(&c), Router::new(&c.routing));
        let d = change(
            "insert",
            "orders",
            Bson::String("../etc".into()),
            Some(doc! {"customerId": "a b", "storeId": "s1", "status": "new"}),
        );
        let out = n.normalize(&d);
        let (r, issues) = router.route(&out.events[0]);
        assert_eq!(rooms(&r.unwrap()), ["store:s1", "admin"]);
        assert_eq!(
            issues,
            [
                RouteIssue::InvalidRoomId {
                    kind: RoomKind::Customer
                },
                RouteIssue::InvalidRoomId {
                    kind: RoomKind::Order
                }
            ]
        );
    }

    pub(crate) const IDS: [&str; 4] = ["c1", "c2", "s1", "s2"];

    pub(crate) fn arb_id() -> impl Strategy<Value = Bson> {
        prop_oneof![
            4 => prop::sample::select(IDS.to_vec()).prop_map(|s| Bson::String(s.into())),
            2 => any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(ObjectId::from_bytes(b))),
            1 => any::<i32>().prop_map(Bson::Int32),
            1 => any::<i64>().prop_map(Bson::Int64),
            1 => any::<f64>().prop_map(Bson::Double),
            1 => Just(Bson::Null),
            1 => Just(Bson::Array(vec![Bson::String("c1".into())])),
            1 => Just(Bson::Document(doc! {"$oid": "c1"})),
            1 => "[ -~]{0,8}".prop_map(Bson::String),
            1 => Just(Bson::String("x".repeat(10_000))),
            1 => Just(Bson::String("../..".into())),
            1 => Just(Bson::String("ü*".into())),
        ]
    }

    pub(crate) fn arb_leaf() -> impl Strategy<Value = Bson> {
        prop_oneof![
            Just(Bson::Null),
            Just(Bson::Undefined),
            Just(Bson::MinKey),
            Just(Bson::MaxKey),
            any::<bool>().prop_map(Bson::Boolean),
            any::<i32>().prop_map(Bson::Int32),
            any::<i64>().prop_map(Bson::Int64),
            any::<f64>().prop_map(Bson::Double),
            any::<i64>().prop_map(|m| Bson::DateTime(bson::DateTime::from_millis(m))),
            any::<(u32, u32)>().prop_map(|(t, i)| Bson::Timestamp(bson::Timestamp {
                time: t,
                increment: i
            })),
            any::<[u8; 16]>().prop_map(|b| Bson::Decimal128(bson::Decimal128::from_bytes(b))),
            prop::collection::vec(any::<u8>(), 0..8).prop_map(|bytes| Bson::Binary(Binary {
                subtype: BinarySubtype::Generic,
                bytes
            })),
            ".{0,12}".prop_map(Bson::String),
            Just(Bson::String("y".repeat(20_000))),
            Just(Bson::JavaScriptCode("while(1){}".into())),
            Just(Bson::RegularExpression(bson::Regex {
                pattern: ".*".into(),
                options: "i".into()
            })),
            arb_id(),
        ]
    }

    pub(crate) fn arb_bson() -> impl Strategy<Value = Bson> {
        arb_leaf().prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Bson::Array),
                prop::collection::btree_map("[a-zA-Z_.$]{1,6}", inner, 0..4)
                    .prop_map(|m| Bson::Document(m.into_iter().collect())),
            ]
        })
    }

    pub(crate) const FIELD_NAMES: [&str; 20] = [
        "customerId",
        "storeId",
        "sellerId",
        "orderId",
        "status",
        "orderType",
        "_id",
        "notes",
        "total",
        "items",
        "storeLogo",
        "username",
        "taxEnabled",
        "paymentProvider",
        "warehouse",
        "warehouse.city",
        "customDomain",
        "shippingPrice",
        "secretKey",
        "deliveryAddress",
    ];

    pub(crate) fn arb_status() -> impl Strategy<Value = Bson> {
        prop_oneof![
            4 => prop::sample::select(vec!["new", "ready", "accepted", "paid", "bogus", "cancelled", "Delivered"])
                .prop_map(|s| Bson::String(s.into())),
            1 => arb_leaf(),
        ]
    }

    pub(crate) fn arb_doc() -> impl Strategy<Value = Document> {
        (
            prop::collection::vec(
                (prop::sample::select(FIELD_NAMES.to_vec()), arb_bson()),
                0..4,
            ),
            prop::option::weighted(0.8, arb_id()),
            prop::option::weighted(0.6, arb_id()),
            prop::option::weighted(0.4, arb_id()),
            prop::option::weighted(0.7, arb_id()),
            prop::option::weighted(0.8, arb_status()),
            prop::option::of(prop::sample::select(vec!["pickup", "delivery"])),
        )
            .prop_map(|(extra, cust, store, seller, order, status, otype)| {
                let mut d = Document::new();
                for (k, v) in extra {
                    d.insert(k, v);
                }
                for (k, v) in [
                    ("customerId", cust),
                    ("storeId", store),
                    ("sellerId", seller),
                    ("orderId", order),
                    ("status", status),
                ] {
                    if let Some(v) = v {
                        d.insert(k, v);
                    }
                }
                if let Some(t) = otype {
                    d.insert("orderType", t);
                }
                d
            })
    }

    pub(crate) fn arb_change() -> impl Strategy<Value = Document> {
        let token = prop_oneof![
            12 => Just(Bson::Document(doc! {"_data": "82AB"})),
            1 => Just(Bson::Null),
            1 => Just(Bson::Document(doc! {"_data": 5})),
            1 => arb_leaf(),
        ];
        let op = prop_oneof![
            8 => prop::sample::select(vec!["insert", "update", "replace", "delete"]).prop_map(|s| Bson::String(s.into())),
            1 => prop::sample::select(vec!["drop", "invalidate", "rename", "wat", ""]).prop_map(|s| Bson::String(s.into())),
            1 => arb_leaf(),
        ];
        let coll = prop_oneof![
            8 => prop::sample::select(vec!["orders", "payments", "settings"]).prop_map(|s| Bson::String(s.into())),
            1 => Just(Bson::String("users".into())),
            1 => arb_leaf(),
        ];
        let doc_or_junk = || {
            prop_oneof![
                6 => arb_doc().prop_map(Bson::Document),
                1 => arb_leaf(),
            ]
        };
        let upd = (
            prop::collection::btree_map(prop::sample::select(FIELD_NAMES.to_vec()), arb_bson(), 0..4),
            prop::collection::vec(prop_oneof![prop::sample::select(FIELD_NAMES.to_vec()).prop_map(|s| Bson::String(s.into())), arb_leaf()], 0..3),
        )
            .prop_map(|(u, r)| doc! {"updatedFields": u.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<Document>(), "removedFields": r});
        (
            // Mostly well-formed envelopes, so that the routing checks see thousands of deliveries.
            prop::option::weighted(0.97, token),
            prop::option::weighted(0.97, op),
            prop::option::weighted(0.97, coll),
            prop::option::weighted(0.9, prop_oneof![6 => arb_id(), 1 => arb_leaf()]),
            prop::option::weighted(0.9, doc_or_junk()),
            prop::option::weighted(0.4, doc_or_junk()),
            prop::option::weighted(
                0.8,
                prop_oneof![4 => upd.prop_map(Bson::Document), 1 => arb_leaf()],
            ),
            prop::option::of(arb_leaf()),
        )
            .prop_map(|(token, op, coll, key, full, pre, upd, wall)| {
                let mut d = Document::new();
                let mut put = |k: &str, v: Option<Bson>| {
                    if let Some(v) = v {
                        d.insert(k, v);
                    }
                };
                put("_id", token);
                put("operationType", op);
                put(
                    "ns",
                    coll.map(|c| Bson::Document(doc! {"db": "app", "coll": c})),
                );
                put("documentKey", key.map(|k| Bson::Document(doc! {"_id": k})));
                put("fullDocument", full);
                put("fullDocumentBeforeChange", pre);
                put("updateDescription", upd);
                put("wallTime", wall);
                d
            })
    }

    /// The spec, written independently of `normalize`: the first present, non-null path.
    fn expected_id(doc: &Document, paths: &[String]) -> Option<String> {
        paths
            .iter()
            .find_map(|p| get_path(doc, p).filter(|v| !matches!(v, Bson::Null)))
            .and_then(|v| id_string(v).ok())
    }

    /// Checks every delivery of a change routed with no memory: its room id is the id at the configured path.
    fn check_strict(
        c: &Config,
        change: &Document,
        routed: &RoutedEvent,
    ) -> Result<(), TestCaseError> {
        let coll = change
            .get_document("ns")
            .ok()
            .and_then(|n| n.get_str("coll").ok())
            .unwrap_or("");
        let op = change.get_str("operationType").unwrap_or("");
        let sub = |k: &str| change.get_document(k).ok();
        let source = if op == "delete" {
            sub("fullDocumentBeforeChange")
        } else {
            sub("fullDocument")
        };
        let empty = Document::new();
        let source = source.unwrap_or(&empty);
        let doc_id = sub("documentKey")
            .and_then(|k| k.get("_id"))
            .or_else(|| {
                if op == "delete" {
                    None
                } else {
                    sub("fullDocument").and_then(|d| d.get("_id"))
                }
            })
            .or_else(|| sub("fullDocumentBeforeChange").and_then(|d| d.get("_id")))
            .filter(|v| !matches!(v, Bson::Null))
            .and_then(|v| id_string(v).ok());
        let f = &c.fields;
        for d in &routed.deliveries {
            let want = match (coll, d.room.kind()) {
                (_, RoomKind::Admin) => continue,
                ("settings", RoomKind::Store | RoomKind::Storefront) => {
                    expected_id(source, &f.settings_store)
                }
                (_, RoomKind::Customer) => expected_id(source, &f.customer),
                (_, RoomKind::Store) => expected_id(source, &f.store),
                ("orders", RoomKind::Order) => doc_id.clone(),
                ("payments", RoomKind::Order) => expected_id(source, &f.order_id),
                (c, k) => return Err(TestCaseError::fail(format!("{k:?} room for {c}"))),
            };
            prop_assert_eq!(
                Some(d.room.id()),
                want.as_deref(),
                "mis-routed: {:?} for {:?}",
                d.room,
                change
            );
        }
        Ok(())
    }

    /// Payload keys an audience may see: its allowlist's top-level names plus event fields.
    /// Declared streams for the hostile-change property: ids at paths the generator
    /// fills (and `_id`), tracked fields among them.
    const DECLARED: &str = r#"
[[streams]]
collection = "deliveries"
module = "delivery"
tracked = ["total", "status"]
[streams.rooms]
customer = "customerId"
store = "storeId"
order = "orderId"
admin = true
[streams.allow]
customer = ["status", "total"]
store = ["status", "notes", "warehouse.city"]
order = ["_id"]
admin = ["status", "total", "notes", "items"]

[[streams]]
collection = "users"
module = "balance"
tracked = ["total"]
[streams.rooms]
customer = "_id"
storefront = "sellerId"
[streams.allow]
customer = ["total"]
storefront = ["username"]
"#;

    /// Every top-level payload field of every delivery is allowlisted for its audience
    /// (or `tracked`/`changedFields`), and every tracked field it carries is too.
    fn check_declared_allowlisted(
        decl: &crate::declared::StreamDecl,
        routed: &RoutedEvent,
    ) -> Result<(), TestCaseError> {
        for d in &routed.deliveries {
            let allow = decl.allow.of(d.room.kind());
            let top: HashSet<&str> = allow.iter().map(|f| f.split('.').next().unwrap()).collect();
            for (k, _) in d.data.value().as_object().unwrap() {
                prop_assert!(
                    top.contains(k.as_str()) || k == "tracked" || k == "changedFields",
                    "{} in {}",
                    k,
                    d.room
                );
            }
            if let Some(t) = d.data.value().get("tracked") {
                for (k, _) in t.as_object().unwrap() {
                    prop_assert!(allow.contains(k), "tracked {} in {}", k, d.room);
                }
            }
        }
        Ok(())
    }

    fn check_allowlisted(
        c: &Config,
        routed: &RoutedEvent,
        coll: CollectionKind,
    ) -> Result<(), TestCaseError> {
        for d in &routed.deliveries {
            let allowed: HashSet<String> = match coll {
                CollectionKind::Settings => {
                    let sections: Vec<&SettingsSection> = c
                        .routing
                        .settings_sections
                        .iter()
                        .filter(|s| d.room.kind() != RoomKind::Storefront || s.public)
                        .collect();
                    if d.room.kind() == RoomKind::Storefront {
                        for s in d.data.value()["sections"].as_array().unwrap() {
                            let s = s.as_str().unwrap();
                            prop_assert!(
                                sections.iter().any(|p| p.name == s),
                                "private section {} on storefront",
                                s
                            );
                        }
                    }
                    sections
                        .iter()
                        .flat_map(|s| {
                            s.fields
                                .iter()
                                .map(|f| f.split('.').next().unwrap().to_owned())
                        })
                        .collect()
                }
                _ => {
                    let l = if coll == CollectionKind::Orders {
                        &c.routing.orders
                    } else {
                        &c.routing.payments
                    };
                    let list = match d.room.kind() {
                        RoomKind::Customer => &l.customer,
                        RoomKind::Store => &l.store,
                        RoomKind::Order => &l.order,
                        RoomKind::Admin => &l.admin,
                        RoomKind::Storefront => {
                            return Err(TestCaseError::fail("storefront for a record"))
                        }
                    };
                    list.iter()
                        .map(|f| f.split('.').next().unwrap().to_owned())
                        .collect()
                }
            };
            for k in d.data.value().as_object().unwrap().keys() {
                prop_assert!(
                    allowed.contains(k) || EVENT_FIELDS.contains(&k.as_str()),
                    "{} leaked to {}",
                    k,
                    d.room
                );
            }
        }
        Ok(())
    }

    proptest! {
        // XorShift: ChaCha in an unoptimized test build dominated the run time.
        #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift, ..ProptestConfig::default() })]

        /// 10,000 hostile change documents: no panic, every room valid and equal to
        /// the id at the configured path (0 mis-routed), payloads allowlisted.
        #[test]
        fn hostile_changes_never_misroute(changes in prop::collection::vec(arb_change(), 1..4)) {
            let c = cfg();
            let router = Router::new(&c.routing);
            let mut strict = Normalizer::from_parts(c.fields.clone(), c.status.clone(), c.mongo.collections.clone(), c.routing.settings_sections.clone(), 0);
            let mut remembering = Normalizer::new(&c);
            // Ids that have appeared at a routing path so far, for the remembering normalizer.
            let mut seen: HashSet<String> = HashSet::new();
            for ch in &changes {
                for sub in ["fullDocument", "fullDocumentBeforeChange"] {
                    if let Ok(d) = ch.get_document(sub) {
                        for p in c.fields.customer.iter().chain(&c.fields.store).chain(&c.fields.order_id).chain(&c.fields.settings_store) {
                            if let Some(id) = get_path(d, p).and_then(|v| id_string(v).ok()) { seen.insert(id); }
                        }
                        if let Some(id) = d.get("_id").and_then(|v| id_string(v).ok()) { seen.insert(id); }
                    }
                }
                if let Some(id) = ch.get_document("documentKey").ok().and_then(|k| k.get("_id")).and_then(|v| id_string(v).ok()) { seen.insert(id); }

                let out = strict.normalize(ch);
                prop_assert!(out.events.len() <= 1);
                for ev in &out.events {
                    let (r, _) = router.route(ev);
                    if let Some(r) = r {
                        let mut uniq = HashSet::new();
                        for d in &r.deliveries { prop_assert!(uniq.insert(d.room.clone()), "room twice"); }
                        check_strict(&c, ch, &r)?;
                        check_allowlisted(&c, &r, ev.collection)?;
                    }
                }
                for ev in remembering.normalize(ch).events {
                    if let (Some(r), _) = router.route(&ev) {
                        check_allowlisted(&c, &r, ev.collection)?;
                        for d in &r.deliveries {
                            prop_assert!(d.room.kind() == RoomKind::Admin || seen.contains(d.room.id()), "guessed room {}", d.room);
                        }
                    }
                }
            }
        }

        /// Random combinations of settings fields: private sections never reach a storefront.
        #[test]
        fn private_settings_never_reach_storefront(
            fields in prop::collection::btree_set(prop::sample::select(FIELD_NAMES.to_vec()), 0..10),
            op in prop::sample::select(vec!["insert", "update", "replace"]),
        ) {
            let c = cfg();
            let router = Router::new(&c.routing);
            let mut n = Normalizer::new(&c);
            let mut full = doc! {"storeId": "s1"};
            for f in &fields { full.insert(*f, "v"); }
            let mut ch = change(op, "settings", Bson::Int32(1), Some(full));
            let upd: Document = fields.iter().map(|f| ((*f).to_owned(), Bson::String("v".into()))).collect();
            ch.insert("updateDescription", doc! {"updatedFields": upd});
            for ev in n.normalize(&ch).events {
                if let (Some(r), _) = router.route(&ev) {
                    check_allowlisted(&c, &r, CollectionKind::Settings)?;
                    let public: HashSet<&str> = c.routing.settings_sections.iter().filter(|s| s.public).flat_map(|s| s.fields.iter().map(String::as_str)).collect();
                    for d in r.deliveries.iter().filter(|d| d.room.kind() == RoomKind::Storefront) {
                        for (k, _) in d.data.value().as_object().unwrap() {
                            prop_assert!(public.contains(k.as_str()) || ["storeId", "sections", "changedFields"].contains(&k.as_str()), "{} on storefront", k);
                        }
                        for f in d.data.value()["changedFields"].as_array().unwrap() {
                            prop_assert!(public.contains(f.as_str().unwrap()));
                        }
                    }
                }
            }
        }

        /// Documents with random extra fields: payloads hold only allowlisted fields and event fields.
        #[test]
        fn payloads_only_allowlisted(
            extra in prop::collection::btree_map("[a-zA-Z]{1,10}", arb_leaf(), 0..8),
            coll in prop::sample::select(vec!["orders", "payments"]),
            cust in prop::sample::select(IDS.to_vec()),
            store in prop::sample::select(IDS.to_vec()),
        ) {
            let c = cfg();
            let router = Router::new(&c.routing);
            let mut n = Normalizer::new(&c);
            let mut full: Document = extra.into_iter().collect();
            full.insert("customerId", cust);
            full.insert("storeId", store);
            full.insert("orderId", "o1");
            full.insert("status", "new");
            let ev = n.normalize(&change("insert", coll, Bson::String("x1".into()), Some(full))).events.remove(0);
            let (r, _) = router.route(&ev);
            let r = r.unwrap();
            check_allowlisted(&c, &r, ev.collection)?;
            for d in &r.deliveries {
                match d.room.kind() {
                    RoomKind::Customer => prop_assert_eq!(d.room.id(), cust),
                    RoomKind::Store => prop_assert_eq!(d.room.id(), store),
                    _ => {}
                }
            }
        }
    }

    proptest! {
        // Fewer cases than above: the generator is the same, and the full suite's time matters.
        #![proptest_config(ProptestConfig { cases: 3_000, failure_persistence: None, rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift, ..ProptestConfig::default() })]

        /// The same hostile changes sent to declared streams (`crate::declared`): no panic,
        /// every room one of the declared kinds with the id at its declared field (0
        /// mis-routed), every payload field allowlisted for its audience.
        #[test]
        fn hostile_changes_to_declared_streams_never_misroute(
            changes in prop::collection::vec((arb_change(), prop::sample::select(vec!["deliveries", "users"])), 1..4),
        ) {
            let c = crate::config::test_config(DECLARED, "t").unwrap();
            // Nothing remembered: every room must come from the change itself.
            let mut strict = crate::declared::Declared::new(&c.streams, 0);
            let mut remembering = crate::declared::Declared::new(&c.streams, 100);
            let mut seen: HashSet<String> = HashSet::new();
            for (ch, coll) in &changes {
                let mut ch = ch.clone();
                if ch.get_document("ns").is_ok() {
                    ch.insert("ns", doc! {"db": "app", "coll": *coll});
                }
                let decl = c.streams.iter().find(|s| s.collection == *coll).unwrap();
                let key = ch.get_document("documentKey").ok().and_then(|k| k.get("_id")).cloned();
                for sub in ["fullDocument", "fullDocumentBeforeChange"] {
                    if let Ok(d) = ch.get_document(sub) {
                        for (_, p) in decl.rooms.keyed() {
                            if let Some(id) = get_path(d, p).and_then(|v| id_string(v).ok()) { seen.insert(id); }
                        }
                    }
                }
                if let Some(id) = key.as_ref().and_then(|v| id_string(v).ok()) { seen.insert(id); }
                let deleted = ch.get_str("operationType") == Ok("delete");
                let source = ch.get_document(if deleted { "fullDocumentBeforeChange" } else { "fullDocument" }).ok().cloned();
                let mut issues = Vec::new();
                if let Some(r) = strict.map_doc(&ch, crate::event::EventId::new("x"), &mut issues).map(|m| m.event) {
                    for d in &r.deliveries {
                        let kind = d.room.kind();
                        if kind == RoomKind::Admin {
                            prop_assert!(decl.rooms.admin);
                            continue;
                        }
                        let path = decl.rooms.keyed().find(|(k, _)| *k == kind).map(|(_, p)| p);
                        prop_assert!(path.is_some(), "undeclared room {}", d.room);
                        let path = path.unwrap();
                        let want = if path == "_id" {
                            // The document's own id: its key, else the id the server's copy
                            // of it carries, after the change or (for any operation) before it.
                            let pre = ch.get_document("fullDocumentBeforeChange").ok().and_then(|p| p.get("_id")).cloned();
                            key.clone().or_else(|| source.as_ref().and_then(|s| s.get("_id")).cloned()).or(pre).filter(|k| !matches!(k, Bson::Null)).and_then(|v| id_string(&v).ok())
                        } else {
                            source.as_ref().and_then(|s| get_path(s, path)).and_then(|v| id_string(v).ok())
                        };
                        prop_assert_eq!(Some(d.room.id().to_owned()), want, "mis-routed {}", d.room);
                    }
                    check_declared_allowlisted(decl, &r)?;
                }
                if let Some(r) = remembering.map_doc(&ch, crate::event::EventId::new("x"), &mut issues).map(|m| m.event) {
                    check_declared_allowlisted(decl, &r)?;
                    for d in &r.deliveries {
                        prop_assert!(d.room.kind() == RoomKind::Admin || seen.contains(d.room.id()), "guessed room {}", d.room);
                    }
                }
            }
        }
    }
}
