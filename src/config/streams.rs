//! `[[streams]]`: the app's own collections, declared, checked against the built-ins and each other.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::errors::{invalid_at, ConfigError, Ctx};
use super::mongodb::Collections;
use super::socketio::EVENT_NAMES;
use super::values::{allowlist, check_name, check_path};
use crate::declared::{EventNames, StreamAllow, StreamDecl, StreamRooms, StreamStatus};
use crate::status::StatusTable;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
    collection: Spanned<String>,
    module: Spanned<String>,
    #[serde(default)]
    events: RawStreamEvents,
    rooms: Spanned<RawStreamRooms>,
    #[serde(default)]
    allow: RawStreamAllow,
    #[serde(default)]
    tracked: Vec<Spanned<String>>,
    status: Option<Spanned<RawStreamStatus>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStreamEvents {
    created: Option<Spanned<String>>,
    updated: Option<Spanned<String>>,
    replaced: Option<Spanned<String>>,
    deleted: Option<Spanned<String>>,
    status_changed: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStreamStatus {
    field: Spanned<String>,
    type_field: Option<Spanned<String>>,
    pickup_types: Option<Spanned<Vec<String>>>,
    map: Spanned<BTreeMap<String, Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStreamRooms {
    customer: Option<Spanned<String>>,
    store: Option<Spanned<String>>,
    order: Option<Spanned<String>>,
    storefront: Option<Spanned<String>>,
    admin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStreamAllow {
    customer: Option<Vec<Spanned<String>>>,
    store: Option<Vec<Spanned<String>>>,
    order: Option<Vec<Spanned<String>>>,
    storefront: Option<Vec<Spanned<String>>>,
    admin: Option<Vec<Spanned<String>>>,
}

/// Longest declared module or event name.
const MAX_EVENT_NAME_LEN: usize = 64;

fn name_chars_ok(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= MAX_EVENT_NAME_LEN
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') || extra.contains(&b)
        })
}

/// A declared event name: `module:action`, so it can never be a Socket.IO reserved
/// name (`connect`, `disconnect`…) or our own `resync`; never a built-in event's name.
fn check_event_name(ctx: &Ctx<'_>, key: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
    let s = v.get_ref();
    if !name_chars_ok(s, b":") || !s.contains(':') {
        return Err(ctx.err(
            key,
            v,
            format!(
                "invalid event name {s:?}: expected \"module:action\", 1-{MAX_EVENT_NAME_LEN} characters of A-Z a-z 0-9 _ . - :"
            ),
        ));
    }
    if EVENT_NAMES.contains(&s.as_str()) || s.starts_with("system:") {
        return Err(ctx.err(
            key,
            v,
            format!("{s:?} is a built-in event name; choose another module or action"),
        ));
    }
    Ok(s.clone())
}

/// `[[streams]]`: each declaration checked against the built-in collections, the
/// checkpoint collection and the other declarations.
pub(super) fn convert(
    ctx: &Ctx<'_>,
    raw: Vec<Spanned<RawStream>>,
    collections: &Collections,
    checkpoint_collection: &str,
) -> Result<Vec<StreamDecl>, ConfigError> {
    let mut out: Vec<StreamDecl> = Vec::new();
    for st in raw {
        let st = st.into_inner();
        let collection = check_name(ctx, "streams.collection", &st.collection)?;
        let taken = [
            collections.orders.as_str(),
            collections.payments.as_str(),
            collections.settings.as_str(),
        ];
        if taken.contains(&collection.as_str()) {
            return Err(ctx.err(
                "streams.collection",
                &st.collection,
                format!("{collection:?} is a built-in collection (mongodb.collections); it cannot also be declared"),
            ));
        }
        if collection == checkpoint_collection {
            return Err(ctx.err(
                "streams.collection",
                &st.collection,
                format!(
                    "{collection:?} is the checkpoint collection (mongodb.checkpoint_collection)"
                ),
            ));
        }
        if out.iter().any(|d| d.collection == collection) {
            return Err(ctx.err(
                "streams.collection",
                &st.collection,
                format!("{collection:?} is declared twice"),
            ));
        }
        let module = st.module.get_ref();
        if !name_chars_ok(module, b"") {
            return Err(ctx.err(
                "streams.module",
                &st.module,
                format!("invalid module {module:?}: expected 1-{MAX_EVENT_NAME_LEN} characters of A-Z a-z 0-9 _ . -"),
            ));
        }
        let event = |action: &str, v: Option<Spanned<String>>| match v {
            Some(v) => check_event_name(ctx, &format!("streams.events.{action}"), &v),
            None => check_event_name(
                ctx,
                "streams.module",
                &Spanned::new(st.module.span(), format!("{module}:{action}")),
            ),
        };
        let status = st
            .status
            .map(|raw| stream_status(ctx, raw.into_inner()))
            .transpose()?;
        let status_changed = match (&status, st.events.status_changed) {
            (Some(_), v) => Some(event("status_changed", v)?),
            (None, Some(v)) => return Err(ctx.err(
                "streams.events.status_changed",
                &v,
                "names the event of a status change, but the stream declares no [streams.status]",
            )),
            (None, None) => None,
        };
        let events = EventNames {
            created: event("created", st.events.created)?,
            updated: event("updated", st.events.updated)?,
            replaced: event("replaced", st.events.replaced)?,
            deleted: event("deleted", st.events.deleted)?,
            status_changed,
        };
        let rooms_span = st.rooms.span();
        let r = st.rooms.into_inner();
        let room_path = |kind: &str, v: Option<Spanned<String>>| {
            v.map(|p| check_path(ctx, &format!("streams.rooms.{kind}"), &p))
                .transpose()
        };
        let rooms = StreamRooms {
            customer: room_path("customer", r.customer)?,
            store: room_path("store", r.store)?,
            order: room_path("order", r.order)?,
            storefront: room_path("storefront", r.storefront)?,
            admin: r.admin.unwrap_or(false),
        };
        if rooms.keyed().next().is_none() && !rooms.admin {
            return Err(invalid_at(
                ctx.text,
                ctx.origin,
                "streams.rooms",
                rooms_span,
                "declares no room: name at least one of customer, store, order, storefront (a field path) or admin = true",
            ));
        }
        // An allowlist per declared room, and none for a room not declared: what an
        // audience sees is always written down, never a default.
        let a = st.allow;
        let lists = [
            ("customer", rooms.customer.is_some(), a.customer),
            ("store", rooms.store.is_some(), a.store),
            ("order", rooms.order.is_some(), a.order),
            ("storefront", rooms.storefront.is_some(), a.storefront),
            ("admin", rooms.admin, a.admin),
        ];
        let mut allow: Vec<Vec<String>> = Vec::new();
        for (kind, declared, list) in lists {
            let key = format!("streams.allow.{kind}");
            match (declared, list) {
                (true, Some(l)) if l.is_empty() => {
                    return Err(invalid_at(
                        ctx.text,
                        ctx.origin,
                        key,
                        rooms_span.clone(),
                        "needs at least one field path (an audience that may see nothing needs no room)",
                    ))
                }
                (true, Some(l)) => allow.push(allowlist(ctx, &key, Some(l), &[])?),
                (true, None) => {
                    return Err(invalid_at(
                        ctx.text,
                        ctx.origin,
                        key,
                        rooms_span.clone(),
                        format!("the stream of {collection:?} routes to {kind} rooms but has no allowlist for them ([streams.allow] {kind} = [...])"),
                    ))
                }
                (false, Some(l)) => {
                    let at = l.first().map_or(rooms_span.clone(), Spanned::span);
                    return Err(invalid_at(
                        ctx.text,
                        ctx.origin,
                        key,
                        at,
                        format!("an allowlist for {kind} rooms, but [streams.rooms] declares none"),
                    ));
                }
                (false, None) => allow.push(Vec::new()),
            }
        }
        let [customer, store, order, storefront, admin]: [Vec<String>; 5] =
            allow.try_into().unwrap_or_default();
        let mut tracked: Vec<String> = Vec::new();
        for t in &st.tracked {
            let p = check_path(ctx, "streams.tracked", t)?;
            if tracked.contains(&p) {
                return Err(ctx.err("streams.tracked", t, format!("{p:?} is listed twice")));
            }
            tracked.push(p);
        }
        out.push(StreamDecl {
            collection,
            module: module.clone(),
            events,
            rooms,
            allow: StreamAllow {
                customer,
                store,
                order,
                storefront,
                admin,
            },
            tracked,
            status,
        });
    }
    Ok(out)
}

/// `[streams.status]`: the field, its table and the optional `ready` split.
fn stream_status(ctx: &Ctx<'_>, raw: RawStreamStatus) -> Result<StreamStatus, ConfigError> {
    let field = check_path(ctx, "streams.status.field", &raw.field)?;
    let type_field = raw
        .type_field
        .map(|p| check_path(ctx, "streams.status.type_field", &p))
        .transpose()?;
    let pickup_types = match (&type_field, raw.pickup_types) {
        (None, Some(p)) => {
            return Err(ctx.err(
                "streams.status.pickup_types",
                &p,
                "splits `ready` by type, but no type_field says where the type is",
            ))
        }
        (Some(_), Some(p)) if p.get_ref().is_empty() => {
            return Err(ctx.err(
                "streams.status.pickup_types",
                &p,
                "needs at least one type (leave it out for the default)",
            ))
        }
        (Some(_), Some(p)) => p
            .into_inner()
            .iter()
            .map(|t| t.trim().to_ascii_lowercase())
            .collect(),
        (Some(_), None) => StatusTable::default().pickup_types,
        (None, None) => Vec::new(),
    };
    if raw.map.get_ref().is_empty() {
        return Err(ctx.err(
            "streams.status.map",
            &raw.map,
            "needs at least one raw = \"canonical\" entry",
        ));
    }
    let mut map = BTreeMap::new();
    for (k, v) in raw.map.into_inner() {
        let key = format!("streams.status.map.{k}");
        if !name_chars_ok(v.get_ref(), b"") {
            return Err(ctx.err(
                &key,
                &v,
                format!(
                    "invalid canonical status {:?}: expected 1-{MAX_EVENT_NAME_LEN} characters of A-Z a-z 0-9 _ . -",
                    v.get_ref()
                ),
            ));
        }
        if map
            .insert(k.trim().to_ascii_lowercase(), v.get_ref().clone())
            .is_some()
        {
            return Err(ctx.err(
                &key,
                &v,
                "is listed twice (raw values compare trimmed and case-insensitively)",
            ));
        }
    }
    Ok(StreamStatus {
        field,
        type_field,
        pickup_types,
        map,
    })
}
