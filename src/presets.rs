//! Orders, payments and settings as built-in presets of the stream engine: their specs, built from the already-parsed `[mongodb.collections]`, `[fields]`, `[status]` and `[routing]` sections; knows nothing of changes.
//!
//! A preset is what a `[[streams]]` declaration would be if it could say everything
//! the Node apps' events carry: several paths per room (first present wins), the
//! status tables with the pickup/delivery split and `progress`, `orderId`/`paymentId`,
//! the private/public settings sections and ownership for `order:` rooms
//! (`declared::Shape`). With the default configuration their events and payloads are
//! the former built-in normalizer's and router's, which a property test checks.

use crate::config::{Allowlists, Config};
use crate::declared::{Key, KeyAt, Names, OwnerPaths, Shape, Spec, StatusRule, StreamAllow, Table};
use crate::room::RoomKind;

/// The three presets, in this order: orders, payments, settings.
pub(crate) fn presets(cfg: &Config) -> [Spec; 3] {
    [orders(cfg), payments(cfg), settings(cfg)]
}

fn names(module: &str, status: bool) -> Names {
    Names {
        created: format!("{module}:created").into(),
        // A replace that does not move the status is an update, as it always was.
        updated: format!("{module}:updated").into(),
        replaced: format!("{module}:updated").into(),
        deleted: Some(format!("{module}:deleted").into()),
        status_changed: status.then(|| format!("{module}:status_changed").into()),
    }
}

fn allow(lists: &Allowlists) -> StreamAllow {
    StreamAllow {
        customer: lists.customer.clone(),
        store: lists.store.clone(),
        order: lists.order.clone(),
        storefront: Vec::new(),
        admin: lists.admin.clone(),
    }
}

fn paths(label: &'static str, paths: &[String]) -> Key {
    Key {
        label,
        at: KeyAt::Paths(paths.to_vec()),
    }
}

/// `order:created|updated|status_changed|deleted` to the customer, the store, the
/// order (its `_id`, joined by its owners) and admin.
fn orders(cfg: &Config) -> Spec {
    let f = &cfg.fields;
    Spec {
        collection: cfg.mongo.collections.orders.clone(),
        names: names("order", true),
        keys: vec![
            paths("customer", &f.customer),
            paths("store", &f.store),
            Key {
                label: "_id",
                at: KeyAt::DocId,
            },
        ],
        rooms: vec![
            (RoomKind::Customer, 0),
            (RoomKind::Store, 1),
            (RoomKind::Order, 2),
        ],
        admin: true,
        allow: allow(&cfg.routing.orders),
        tracked: Vec::new(),
        status: Some(StatusRule {
            field: f.status.clone(),
            type_field: Some(f.order_type.clone()),
            table: Table::Order(cfg.status.clone()),
        }),
        shape: Shape::Record { payment: false },
        owners: Some(OwnerPaths {
            customer: f.customer.clone(),
            store: f.store.clone(),
        }),
        missing: "customer",
    }
}

/// `payment:created|updated|status_changed|deleted` to the customer, the store, the
/// order it pays (`order:{orderId}`) and admin.
fn payments(cfg: &Config) -> Spec {
    let f = &cfg.fields;
    Spec {
        collection: cfg.mongo.collections.payments.clone(),
        names: names("payment", true),
        keys: vec![
            paths("customer", &f.customer),
            paths("store", &f.store),
            paths("order_id", &f.order_id),
        ],
        rooms: vec![
            (RoomKind::Customer, 0),
            (RoomKind::Store, 1),
            (RoomKind::Order, 2),
        ],
        admin: true,
        allow: allow(&cfg.routing.payments),
        tracked: Vec::new(),
        status: Some(StatusRule {
            field: f.payment_status.clone(),
            type_field: None,
            table: Table::Payment(cfg.status.clone()),
        }),
        shape: Shape::Record { payment: true },
        owners: None,
        missing: "order_id",
    }
}

/// `settings:updated` to the store, admin, and for public sections the storefront;
/// deletes are no event.
fn settings(cfg: &Config) -> Spec {
    let mut names = names("settings", false);
    names.created = names.updated.clone();
    names.deleted = None;
    Spec {
        collection: cfg.mongo.collections.settings.clone(),
        names,
        keys: vec![paths("store", &cfg.fields.settings_store)],
        rooms: vec![(RoomKind::Store, 0), (RoomKind::Storefront, 0)],
        admin: true,
        allow: StreamAllow::default(),
        tracked: Vec::new(),
        status: None,
        shape: Shape::Settings(cfg.routing.settings_sections.clone()),
        owners: None,
        missing: "store",
    }
}
