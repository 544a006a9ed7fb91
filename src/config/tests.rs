//! The configuration's tests: every section's defaults, errors with key and position, masking, round trips.

use std::time::Duration;

use super::auth::mask_table;
use super::mongodb::mask_uri_password;
use super::routing::default_order_allowlists;
use super::socketio::default_aliases;
use super::values::{format_duration, parse_duration};
use super::*;
use crate::room::RoomKind;
use crate::status::{OrderStatus, StatusTable};

const EXAMPLE: &str = include_str!("../../config.example.toml");

fn parse(text: &str) -> Result<Config, ConfigError> {
    test_config(text, "test.toml")
}

fn invalid(text: &str) -> (String, Option<(usize, usize)>, String) {
    match parse(text) {
        Err(ConfigError::Invalid { key, at, message }) => (key, at.line_col, message),
        other => panic!("expected an invalid-config error, got {other:?}"),
    }
}

#[test]
fn example_parses_and_matches_defaults() {
    let ex = test_config(EXAMPLE, "config.example.toml").unwrap();
    let def = parse("").unwrap();
    // The example documents the defaults; keep them in sync.
    assert_eq!(ex.mongo.databases, def.mongo.databases);
    assert_eq!(ex.mongo.collections, def.mongo.collections);
    assert_eq!(ex.mongo.uri, def.mongo.uri);
    assert_eq!(ex.mongo.connect_timeout, def.mongo.connect_timeout);
    assert_eq!(ex.fields.store, def.fields.store);
    assert_eq!(ex.status.order, def.status.order);
    assert_eq!(ex.status.payment, def.status.payment);
    assert_eq!(ex.status.pickup_types, def.status.pickup_types);
    assert_eq!(ex.hub.history_len, def.hub.history_len);
    assert_eq!(ex.hub.history_age, def.hub.history_age);
    assert_eq!(ex.checkpoint.store, def.checkpoint.store);
    assert_eq!(ex.checkpoint.interval, def.checkpoint.interval);
    assert_eq!(ex.server.listen, def.server.listen);
    assert_eq!(ex.server.ping_interval, def.server.ping_interval);
    assert_eq!(ex.server.auth_deadline, def.server.auth_deadline);
    assert_eq!(
        ex.server.header_read_timeout,
        def.server.header_read_timeout
    );
    assert_eq!(
        ex.server.max_unauthenticated,
        def.server.max_unauthenticated
    );
    assert_eq!(
        ex.server.max_unauthenticated_per_ip,
        def.server.max_unauthenticated_per_ip
    );
    assert_eq!(ex.server.replay_timeout, def.server.replay_timeout);
    assert_eq!(ex.routing.orders, def.routing.orders);
    assert_eq!(ex.routing.payments, def.routing.payments);
    assert_eq!(ex.routing.settings_sections, def.routing.settings_sections);
    assert_eq!(ex.log.level, def.log.level);
    // The example lists the built-in aliases exactly (deleting them changes nothing),
    // plus one for its declared `users` stream. Declared streams are examples, not
    // defaults: a config without `[[streams]]` has neither them nor their aliases.
    let declared: Vec<&str> = ex.streams.iter().flat_map(|s| s.events.all()).collect();
    let (for_declared, builtin): (Vec<Alias>, Vec<Alias>) = ex
        .socketio
        .aliases
        .iter()
        .cloned()
        .partition(|a| declared.contains(&a.event.as_str()));
    assert_eq!(builtin, def.socketio.aliases);
    assert_eq!(
        for_declared
            .iter()
            .map(|a| (a.event.as_str(), a.name.as_str()))
            .collect::<Vec<_>>(),
        [("balance:updated", "balance-updated")]
    );
    assert!(def.streams.is_empty());
    let colls: Vec<&str> = ex.streams.iter().map(|s| s.collection.as_str()).collect();
    assert_eq!(colls, ["users", "deliveries"]);
    let users = &ex.streams[0];
    assert_eq!(users.tracked, ["balance"]);
    assert_eq!(users.rooms.customer.as_deref(), Some("_id"));
    assert_eq!(users.events.updated, "balance:updated");
    let deliveries = &ex.streams[1];
    assert_eq!(deliveries.rooms.customer.as_deref(), Some("customerId"));
    assert_eq!(deliveries.rooms.store.as_deref(), Some("storeId"));
    // The example ships the Node apps' aliases.
    let names: Vec<&str> = ex
        .socketio
        .aliases
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    for n in [
        "newOrder",
        "orderStatusUpdated",
        "customer_order_update",
        "delivery_update",
        "payment:added",
        "payment:updated",
        "settings:updated",
    ] {
        assert!(names.contains(&n), "alias {n} missing");
    }
    let delivery = ex
        .socketio
        .aliases
        .iter()
        .find(|a| a.name == "delivery_update")
        .unwrap();
    assert_eq!(
        delivery.statuses.as_deref().unwrap(),
        ["driver_assigned", "picked_up", "in_transit", "delivered"]
    );
    assert_eq!(delivery.rooms, [RoomKind::Customer, RoomKind::Order]);
}

#[test]
fn defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.max_message_bytes.get(), 65_536);
    assert_eq!(c.server.auth_deadline, Duration::from_secs(10));
    assert_eq!(c.hub.history_age, Duration::from_secs(300));
    assert_eq!(c.checkpoint.every_events.get(), 1000);
    assert_eq!(
        c.checkpoint.store,
        CheckpointStoreConfig::File {
            path: "changecast.checkpoint".into()
        }
    );
    assert_eq!(c.fields.customer, ["customerId"]);
    assert_eq!(c.fields.store, ["storeId", "sellerId"]);
    assert_eq!(c.mongo.checkpoint_collection, "changecast_checkpoints");
    // The legacy names are on unless turned off.
    assert!(c.socketio.enabled && c.socketio.aliases == default_aliases());
    let off = parse("[socketio]\naliases = []\n").unwrap();
    assert!(off.socketio.aliases.is_empty());
    assert_eq!(c.log.format, LogFormat::Pretty);
    assert_eq!(c.normalize.state_cache_docs, 100_000);
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration(" 5m "), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    // Zero parses; the intervals and timeouts refuse it, `auth.leeway` takes it.
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    for bad in [
        "30",
        "",
        "s",
        "1.5s",
        "-1s",
        "10 days",
        "5d",
        "1sm",
        "99999999999999999999s",
        "5mm",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
    }
    assert!(parse_duration(&format!("{}h", u64::MAX / 60)).is_err());
    for d in ["250ms", "30s", "5m", "1h", "1500ms"] {
        assert_eq!(format_duration(parse_duration(d).unwrap()), d);
    }
    let (key, pos, msg) = invalid("[server]\nping_interval = \"0s\"\n");
    assert_eq!((key.as_str(), pos), ("server.ping_interval", Some((2, 17))));
    assert!(msg.contains("must be greater than zero"), "{msg}");
    let c = parse("[auth]\nleeway = \"0s\"\norder_cache_ttl = \"0s\"\n").unwrap();
    assert_eq!(c.auth.leeway, Duration::ZERO);
    assert_eq!(c.auth.order_lookup.ttl, Duration::ZERO);
}

#[test]
fn the_never_read_owner_cache_key_points_to_the_one_that_works() {
    let (key, pos, msg) = invalid("[server]\norder_owner_cache_ttl = \"1s\"\n");
    assert_eq!(key, "server.order_owner_cache_ttl");
    assert_eq!(pos.map(|p| p.0), Some(2));
    assert!(msg.contains("auth.order_cache_ttl"), "{msg}");
}

#[test]
fn unknown_key_names_key_and_position() {
    let (key, pos, msg) = invalid("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n");
    assert_eq!(key, "server.lisen");
    assert_eq!(pos, Some((3, 1)));
    assert!(msg.contains("unknown field"), "{msg}");
    let err = parse("[server]\nlisen = 1\n").unwrap_err().to_string();
    assert!(
        err.starts_with("test.toml:2:1: server.lisen: unknown field"),
        "{err}"
    );

    let (key, pos, _) = invalid("\n[nope]\na = 1\n");
    assert_eq!(key, "nope");
    assert_eq!(pos.map(|p| p.0), Some(2));
}

#[test]
fn wrong_type_names_key_and_position() {
    let (key, pos, msg) = invalid("[hub]\nhistory_len = \"many\"\n");
    assert_eq!(key, "hub.history_len");
    assert_eq!(pos, Some((2, 15)));
    assert!(msg.contains("invalid type"), "{msg}");
    let (key, pos, _) = invalid("[hub]\nhistory_len = 0\n");
    assert_eq!((key.as_str(), pos), ("hub.history_len", Some((2, 15))));
    let (key, _, _) = invalid("[server]\nlisten = \"localhost\"\n");
    assert_eq!(key, "server.listen");
}

#[test]
fn bad_duration_names_key_and_position() {
    let (key, pos, msg) = invalid("[server]\n# c\nping_interval = \"25 parsecs\"\n");
    assert_eq!(key, "server.ping_interval");
    assert_eq!(pos, Some((3, 17)));
    assert!(msg.contains("unknown unit"), "{msg}");
    let (key, _, msg) = invalid("[checkpoint]\ninterval = 30\n");
    assert_eq!(key, "checkpoint.interval");
    assert!(msg.contains("needs a unit"), "{msg}");
}

#[test]
fn semantic_errors_have_positions() {
    let (key, pos, msg) = invalid("[status.order]\nshipped = \"sent\"\n");
    assert_eq!(key, "status.order.shipped");
    assert_eq!(pos, Some((2, 11)));
    assert!(msg.contains("unknown canonical order status"), "{msg}");

    let text =
        "[[socketio.aliases]]\nevent = \"order:exploded\"\nname = \"x\"\nrooms = [\"store\"]\n";
    let (key, pos, _) = invalid(text);
    assert_eq!(
        (key.as_str(), pos),
        ("socketio.aliases.event", Some((2, 9)))
    );

    let text = "[[socketio.aliases]]\nevent = \"order:created\"\nname = \"x\"\nrooms = [\"store\", \"planet\"]\n";
    let (key, pos, _) = invalid(text);
    assert_eq!(
        (key.as_str(), pos),
        ("socketio.aliases.rooms", Some((4, 19)))
    );

    let (key, _, _) = invalid("[fields]\ncustomer = \"a..b\"\n");
    assert_eq!(key, "fields.customer");
    let (key, _, _) = invalid("[checkpoint]\nstore = \"mongo\"\npath = \"x\"\n");
    assert_eq!(key, "checkpoint.path");
    let (key, _, _) = invalid("[checkpoint]\nstore = \"redis\"\n");
    assert_eq!(key, "checkpoint.store");
    let (key, _, _) = invalid("[log]\nformat = \"xml\"\n");
    assert_eq!(key, "log.format");
}

#[test]
fn overrides_merge_over_defaults() {
    let c = parse(
        "[status.order]\nShipped = \"in_transit\"\n[status]\npickup_types = [\"Curbside\"]\n\
         [routing.settings.loyalty]\nfields = [\"loyaltyProgram\"]\npublic = true\n\
         [routing.orders]\ncustomer = [\"_id\", \"status\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.status.order_status("SHIPPED", None),
        Some(OrderStatus::InTransit)
    );
    assert_eq!(
        c.status.order_status("new", None),
        Some(OrderStatus::Pending)
    );
    assert!(c.status.is_pickup(Some("curbside")));
    assert!(!c.status.is_pickup(Some("pickup")));
    assert!(c
        .routing
        .settings_sections
        .iter()
        .any(|s| s.name == "loyalty" && s.public));
    assert_eq!(c.routing.settings_sections.len(), 11);
    assert_eq!(c.routing.orders.customer, ["_id", "status"]);
    assert_eq!(c.routing.orders.store, default_order_allowlists().store);
}

#[test]
fn secrets_are_masked() {
    let mut c = parse("[mongodb]\nuri = \"mongodb://app:hunter2@db1:27017,db2/?replicaSet=rs0\"\n")
        .unwrap();
    assert_eq!(format!("{:?}", c.mongo.uri), "***");
    assert_eq!(c.mongo.uri.to_string(), "***");
    assert!(!format!("{c:?}").contains("hunter2"));
    let out = c.effective_toml_masked();
    assert!(!out.contains("hunter2"), "{out}");
    assert!(
        out.contains("mongodb://app:***@db1:27017,db2/?replicaSet=rs0"),
        "{out}"
    );
    // The effective config is itself a valid config.
    let again = parse(&out).unwrap();
    assert_eq!(again.server.listen, c.server.listen);
    assert_eq!(again.routing.settings_sections, c.routing.settings_sections);

    c.apply_env(|k| (k == "MONGODB_URI").then(|| "mongodb://u:s3cret@h/".to_owned()))
        .unwrap();
    assert_eq!(c.mongo.uri.expose(), "mongodb://u:s3cret@h/");
    assert!(!c.effective_toml_masked().contains("s3cret"));
    assert!(c.apply_env(|_| Some("http://x".into())).is_err());

    assert_eq!(mask_uri_password("mongodb://h/db"), "mongodb://h/db");
    assert_eq!(mask_uri_password("mongodb://u@h/db"), "mongodb://u@h/db");
    assert_eq!(
        mask_uri_password(
            "mongodb+srv://u:p@c.example/?authMechanismProperties=AWS_SESSION_TOKEN:t"
        ),
        "mongodb+srv://u:***@c.example/?authMechanismProperties=***"
    );
    let t: toml::Table =
        toml::from_str("secret = \"s\"\nalgorithms = [\"HS256\"]\n[jwks]\nprivate_key = \"k\"\n")
            .unwrap();
    let m = mask_table(&t);
    assert_eq!(m["secret"].as_str(), Some("***"));
    assert_eq!(m["jwks"]["private_key"].as_str(), Some("***"));
    assert!(m["algorithms"].is_array());
}

#[test]
fn example_effective_output_round_trips() {
    let ex = test_config(EXAMPLE, "config.example.toml").unwrap();
    let out = ex.effective_toml_masked();
    let again = parse(&out).unwrap();
    assert_eq!(again.socketio.aliases, ex.socketio.aliases);
    assert_eq!(again.status.order, ex.status.order);
    assert_eq!(again.fields.settings_store, ex.fields.settings_store);
    assert_eq!(again.streams, ex.streams);
}

const STREAM: &str = "[[streams]]\ncollection = \"users\"\nmodule = \"balance\"\n\
    tracked = [\"balance\"]\n[streams.rooms]\ncustomer = \"_id\"\nadmin = true\n\
    [streams.allow]\ncustomer = [\"balance\"]\nadmin = [\"balance\", \"email\"]\n";

#[test]
fn declared_streams_parse_with_default_and_overridden_names() {
    let c = parse(STREAM).unwrap();
    let s = &c.streams[0];
    assert_eq!(
        s.events.all(),
        [
            "balance:created",
            "balance:updated",
            "balance:replaced",
            "balance:deleted"
        ]
    );
    assert!(s.rooms.admin);
    assert_eq!(s.allow.admin, ["balance", "email"]);
    let c = parse(&format!(
        "{STREAM}[streams.events]\nupdated = \"wallet:changed\"\n"
    ))
    .unwrap();
    assert_eq!(c.streams[0].events.updated, "wallet:changed");
    assert_eq!(c.streams[0].events.created, "balance:created");
    // An alias may name a declared event; without the declaration it may not.
    let alias = "[[socketio.aliases]]\nevent = \"balance:updated\"\nname = \"balance-updated\"\nrooms = [\"customer\"]\n";
    let c = parse(&format!("{alias}{STREAM}")).unwrap();
    assert_eq!(c.socketio.aliases[0].event, "balance:updated");
    let (key, _, msg) = invalid(alias);
    assert_eq!(key, "socketio.aliases.event");
    assert!(msg.contains("unknown event"), "{msg}");
}

/// Each text is refused with the key, line and message part given.
fn assert_invalid_at<const N: usize>(cases: [(String, &str, usize, &str); N]) {
    let mut wrong = Vec::new();
    for (text, want_key, want_line, want_msg) in cases {
        let (key, at, msg) = invalid(&text);
        if key != want_key || at.map(|a| a.0) != Some(want_line) || !msg.contains(want_msg) {
            wrong.push(format!(
                "{key} at {at:?}: {msg} (wanted {want_key} at line {want_line}: …{want_msg}…)"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

const STATUS: &str = "[streams.status]\nfield = \"state\"\n[streams.status.map]\n\
    Scheduled = \"pending\"\nloaded = \"ready\"\n";

#[test]
fn a_declared_status_table_parses_and_round_trips() {
    let c = parse(&format!("{STREAM}{STATUS}")).unwrap();
    let st = c.streams[0].status.as_ref().unwrap();
    assert_eq!(st.field, "state");
    assert_eq!(st.map.get("scheduled").map(String::as_str), Some("pending"));
    assert!(st.type_field.is_none() && st.pickup_types.is_empty());
    assert_eq!(
        c.streams[0].events.status_changed.as_deref(),
        Some("balance:status_changed")
    );
    assert_eq!(c.streams[0].events.all().len(), 5);
    // A type field brings the default pickup types; a name of one's own is kept.
    let c = parse(&format!(
        "{STREAM}[streams.events]\nstatus_changed = \"wallet:moved\"\n{STATUS}"
    ))
    .unwrap();
    assert_eq!(
        c.streams[0].events.status_changed.as_deref(),
        Some("wallet:moved")
    );
    let c = parse(&format!(
        "{STREAM}{}",
        STATUS.replace(
            "[streams.status.map]",
            "type_field = \"kind\"\n[streams.status.map]"
        )
    ))
    .unwrap();
    let st = c.streams[0].status.as_ref().unwrap();
    assert_eq!(st.pickup_types, StatusTable::default().pickup_types);
    let again = parse(&c.effective_toml_masked()).unwrap();
    assert_eq!(again.streams, c.streams);
    // Without [streams.status] nothing changes.
    assert!(parse(STREAM).unwrap().streams[0].status.is_none());
}

#[test]
fn declared_status_errors_name_key_and_position() {
    let cases: [(String, &str, usize, &str); 6] = [
        (
            format!("{STREAM}{}", STATUS.replace("\"pending\"", "\"pend ing\"")),
            "streams.status.map.Scheduled",
            14,
            "invalid canonical status",
        ),
        (
            format!("{STREAM}{}", STATUS.replace("loaded", "scheduled")),
            "streams.status.map.scheduled",
            15,
            "twice",
        ),
        (
            format!("{STREAM}[streams.status]\nfield = \"state\"\nmap = {{}}\n"),
            "streams.status.map",
            13,
            "at least one",
        ),
        (
            format!(
                "{STREAM}{}",
                STATUS.replace(
                    "[streams.status.map]",
                    "pickup_types = [\"x\"]\n[streams.status.map]"
                )
            ),
            "streams.status.pickup_types",
            13,
            "no type_field",
        ),
        (
            format!("{STREAM}[streams.events]\nstatus_changed = \"balance:moved\"\n"),
            "streams.events.status_changed",
            12,
            "no [streams.status]",
        ),
        (
            format!("{STREAM}{}", STATUS.replace("field", "feld")),
            "streams.status.feld",
            12,
            "unknown field",
        ),
    ];
    assert_invalid_at(cases);
}

#[test]
fn declared_stream_errors_name_key_and_position() {
    let cases: [(String, &str, usize, &str); 9] = [
        (
            STREAM.replace("\"users\"", "\"orders\""),
            "streams.collection",
            2,
            "built-in",
        ),
        (
            STREAM.replace("\"users\"", "\"changecast_checkpoints\""),
            "streams.collection",
            2,
            "checkpoint",
        ),
        (
            format!("{STREAM}{STREAM}"),
            "streams.collection",
            12,
            "twice",
        ),
        (
            STREAM.replace("tracked", "trackd"),
            "streams.trackd",
            4,
            "unknown field",
        ),
        (
            STREAM.replace("\"balance\"\ntracked", "\"bal ance\"\ntracked"),
            "streams.module",
            3,
            "invalid module",
        ),
        (
            format!("{STREAM}[streams.events]\ncreated = \"order:created\"\n"),
            "streams.events.created",
            12,
            "built-in",
        ),
        (
            format!("{STREAM}[streams.events]\ndeleted = \"gone\"\n"),
            "streams.events.deleted",
            12,
            "module:action",
        ),
        (
            STREAM.replace("admin = [\"balance\", \"email\"]\n", ""),
            "streams.allow.admin",
            5,
            "no allowlist",
        ),
        (
            STREAM.replace("customer = \"_id\"\nadmin = true\n", ""),
            "streams.rooms",
            5,
            "declares no room",
        ),
    ];
    assert_invalid_at(cases);
}
