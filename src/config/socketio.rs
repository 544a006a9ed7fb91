//! `[socketio]`: the Socket.IO endpoint and the legacy event names it also emits.

use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use super::errors::{ConfigError, Ctx};
use super::values::check_name;
use crate::declared::StreamDecl;
use crate::room::RoomKind;
use crate::status::{OrderStatus, PaymentStatus};

/// Canonical event names (the names `/ws` clients see; Socket.IO aliases map from these).
pub(crate) const EVENT_NAMES: [&str; 10] = [
    "order:created",
    "order:status_changed",
    "order:updated",
    "order:deleted",
    "payment:created",
    "payment:status_changed",
    "payment:updated",
    "payment:deleted",
    "settings:updated",
    "system:resync",
];

/// `[socketio]`: the Socket.IO endpoint and its legacy event names.
#[derive(Debug, Clone, Serialize)]
pub struct SocketIoConfig {
    /// Serve `/socket.io/`; default true.
    pub(crate) enabled: bool,
    /// Extra names under which canonical events are also emitted.
    pub(crate) aliases: Vec<Alias>,
}

/// One legacy event name: when `event` is delivered to a room of one of `rooms`'
/// kinds (and, if `statuses` is set, the payload's normalized `status` is one of
/// them), Socket.IO clients in that room also receive it as `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Alias {
    /// Canonical event name, one of [`EVENT_NAMES`].
    pub(crate) event: String,
    /// The legacy name, e.g. `newOrder`.
    pub(crate) name: String,
    /// Audience room kinds.
    #[serde(serialize_with = "ser_room_kinds")]
    pub(crate) rooms: Vec<RoomKind>,
    /// Only when the normalized status is one of these (canonical names: of orders and
    /// payments, or for a declared stream its `[streams.status]` targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) statuses: Option<Vec<String>>,
}

/// The legacy event names the Node apps emit, on by default (config.example.toml lists
/// the same, and a test keeps the two equal).
pub(super) fn default_aliases() -> Vec<Alias> {
    use RoomKind::{Customer, Order, Store, Storefront};
    let a = |event: &str, name: &str, rooms: &[RoomKind], statuses: Option<&[&str]>| Alias {
        event: event.to_owned(),
        name: name.to_owned(),
        rooms: rooms.to_vec(),
        statuses: statuses.map(|s| s.iter().map(|x| (*x).to_owned()).collect()),
    };
    vec![
        a("order:created", "newOrder", &[Store], None),
        a(
            "order:status_changed",
            "orderStatusUpdated",
            &[Store, Customer],
            None,
        ),
        a(
            "order:status_changed",
            "customer_order_update",
            &[Customer],
            None,
        ),
        a(
            "order:status_changed",
            "delivery_update",
            &[Customer, Order],
            Some(&["driver_assigned", "picked_up", "in_transit", "delivered"]),
        ),
        a("payment:created", "payment:added", &[Store], None),
        a(
            "payment:status_changed",
            "payment:updated",
            &[Store, Customer],
            None,
        ),
        a(
            "settings:updated",
            "settings:updated",
            &[Store, Storefront],
            None,
        ),
    ]
}

fn ser_room_kinds<S: Serializer>(kinds: &[RoomKind], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(kinds.iter().map(|k| k.as_str()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSocketIo {
    enabled: Option<bool>,
    aliases: Option<Vec<RawAlias>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlias {
    event: Spanned<String>,
    name: Spanned<String>,
    rooms: Vec<Spanned<String>>,
    statuses: Option<Vec<Spanned<String>>>,
}

fn room_kind(s: &str) -> Option<RoomKind> {
    Some(match s {
        "customer" => RoomKind::Customer,
        "store" => RoomKind::Store,
        "order" => RoomKind::Order,
        "storefront" => RoomKind::Storefront,
        "admin" => RoomKind::Admin,
        _ => return None,
    })
}

pub(super) fn convert(
    ctx: &Ctx<'_>,
    socketio: RawSocketIo,
    streams: &[StreamDecl],
) -> Result<SocketIoConfig, ConfigError> {
    // Unset: the Node apps' legacy names, so a minimal config keeps the drop-in
    // promise; `aliases = []` turns them off; a list given replaces them.
    let defaulted = socketio.aliases.is_none();
    let mut aliases = Vec::new();
    for a in socketio.aliases.unwrap_or_default() {
        let key = "socketio.aliases";
        // Declared streams' names are events like the built-ins' (checked above).
        let known = EVENT_NAMES
            .iter()
            .copied()
            .chain(streams.iter().flat_map(|s| s.events.all()))
            .collect::<Vec<&str>>();
        if !known.contains(&a.event.get_ref().as_str()) {
            return Err(ctx.err(
                format!("{key}.event"),
                &a.event,
                format!(
                    "unknown event {:?}; expected one of: {}",
                    a.event.get_ref(),
                    known.join(", ")
                ),
            ));
        }
        let name = check_name(ctx, &format!("{key}.name"), &a.name)?;
        if a.rooms.is_empty() {
            return Err(ctx.err(
                format!("{key}.rooms"),
                &a.name,
                "needs at least one room kind",
            ));
        }
        let mut rooms = Vec::new();
        for r in &a.rooms {
            let k = room_kind(r.get_ref()).ok_or_else(|| {
                    ctx.err(
                        format!("{key}.rooms"),
                        r,
                        format!(
                            "unknown room kind {:?}; expected customer, store, order, storefront or admin",
                            r.get_ref()
                        ),
                    )
                })?;
            if !rooms.contains(&k) {
                rooms.push(k);
            }
        }
        let statuses = match a.statuses {
            None => None,
            Some(list) => {
                let mut out = Vec::new();
                for s in list {
                    let v = s.get_ref();
                    // A declared stream's statuses are its own table's targets.
                    let verdict = match crate::declared::alias_status(streams, a.event.get_ref(), v)
                    {
                        Some(verdict) => verdict,
                        None if OrderStatus::parse(v).is_some()
                            || PaymentStatus::parse(v).is_some() =>
                        {
                            Ok(())
                        }
                        None => Err(format!("{v:?} is not a canonical order or payment status")),
                    };
                    if let Err(message) = verdict {
                        return Err(ctx.err(format!("{key}.statuses"), &s, message));
                    }
                    out.push(v.clone());
                }
                Some(out)
            }
        };
        aliases.push(Alias {
            event: a.event.into_inner(),
            name,
            rooms,
            statuses,
        });
    }
    if defaulted {
        aliases = default_aliases();
    }
    let socketio = SocketIoConfig {
        enabled: socketio.enabled.unwrap_or(true),
        aliases,
    };
    Ok(socketio)
}
