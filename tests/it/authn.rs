//! Integration tests: the token matrix on every carrier (header, subprotocol, query, `auth` message), expiry mid-connection and refresh.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bson::doc;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

/// Issuer and audience the matrix server is configured with.
const ISSUER: &str = "https://issuer.it.example";
const AUDIENCE: &str = "changecast-it";

pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

/// The whole config text: support's `[mongodb]`/`[checkpoint]`, then `auth` as the `[auth]` table.
pub(crate) fn config_text(db: &Db, checkpoint: &Path, auth: &str, extra: &str) -> String {
    std::env::set_var(SECRET_ENV, SECRET);
    format!(
        r#"
[mongodb]
uri = "{uri}"
databases = ["{db}"]
connect_timeout = "5s"

[checkpoint]
store = "file"
path = "{cp}"
interval = "100ms"
every_events = 100

[auth]
{auth}

{extra}
"#,
        uri = db.uri,
        db = db.name,
        cp = checkpoint.display(),
    )
}

/// A server whose `[auth]` table is `auth` (support's servers are pinned to HS256 without iss/aud).
pub(crate) async fn start_with_auth(db: &Db, auth: &str, extra: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(db, &dir.path().join("checkpoint.json"), auth, extra);
    let cfg = changecast::config::Config::from_toml_str(&text, "authn.toml").expect("config");
    let handle = changecast::app::start(
        &cfg,
        changecast::app::RunOptions::default(),
        listeners().await,
        None,
    )
    .await
    .expect("start changecast");
    let s = Server::new(handle, dir);
    s.wait_ready().await;
    s
}

fn hs(alg: Algorithm, claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn rs256(kid: Option<&str>, claims: &Value, private_pem: &str) -> String {
    let key = EncodingKey::from_rsa_pem(&std::fs::read(fixture(private_pem)).unwrap()).unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Claims valid for the matrix server.
fn good() -> Value {
    json!({"sub": "c1", "role": "customer", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600})
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// How a client presents its token.
#[derive(Debug, Clone, Copy)]
enum Carrier {
    Header,
    Subprotocol,
    Query,
    Message,
}

/// What the server answered: a pre-upgrade refusal (status, code), an in-band refusal
/// (code, close code), or a welcome.
#[derive(Debug, PartialEq)]
enum Outcome {
    Refused(u16, String),
    InBand(String, Option<u16>),
    Welcome,
}

async fn present(server: &Server, carrier: Carrier, tok: &str) -> Outcome {
    let url = match carrier {
        Carrier::Query => format!("{}?token={tok}", server.ws_url()),
        _ => server.ws_url(),
    };
    let mut req = url.as_str().into_client_request().unwrap();
    match carrier {
        Carrier::Header => {
            req.headers_mut()
                .insert("authorization", format!("Bearer {tok}").parse().unwrap());
        }
        Carrier::Subprotocol => {
            req.headers_mut().insert(
                "sec-websocket-protocol",
                format!("changecast.v1, bearer.{tok}").parse().unwrap(),
            );
        }
        Carrier::Query | Carrier::Message => {}
    }
    let mut c = match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            if let Carrier::Subprotocol = carrier {
                // The token must never be echoed back; only the protocol name is.
                assert_eq!(
                    resp.headers()
                        .get("sec-websocket-protocol")
                        .map(|v| v.to_str().unwrap()),
                    Some("changecast.v1")
                );
            }
            Client { ws }
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .unwrap_or(Value::Null);
            assert!(
                !body.to_string().contains(tok) || tok.len() < 8,
                "the refusal echoes the token"
            );
            return Outcome::Refused(
                resp.status().as_u16(),
                body["error"].as_str().unwrap_or("").to_owned(),
            );
        }
        Err(e) => panic!("connect failed: {e}"),
    };
    if let Carrier::Message = carrier {
        c.send_json(json!({"type": "auth", "token": tok})).await;
    }
    let m = c.next_json().await;
    match m["type"].as_str() {
        Some("welcome") => Outcome::Welcome,
        Some("error") => Outcome::InBand(
            m["code"].as_str().unwrap().to_owned(),
            c.closed_with(Duration::from_secs(5)).await,
        ),
        _ => panic!("unexpected answer {m}"),
    }
}

fn expected(carrier: Carrier, code: &str) -> Outcome {
    match carrier {
        Carrier::Message => Outcome::InBand(code.to_owned(), Some(4500)),
        _ => Outcome::Refused(401, code.to_owned()),
    }
}

/// Reads `changecast_auth_failures_total{reason=…}` from the process's own registry.
fn auth_failures(server: &Server) -> std::collections::BTreeMap<String, u64> {
    let text = server.app().metrics.encode();
    text.lines()
        .filter_map(|l| l.strip_prefix("changecast_auth_failures_total{reason=\""))
        .filter_map(|l| {
            let (reason, rest) = l.split_once("\"} ")?;
            Some((reason.to_owned(), rest.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_token_matrix_on_every_carrier() {
    let db = Db::start().await;
    let auth = format!(
        "algorithms = [\"HS256\"]\nsecret_env = \"{SECRET_ENV}\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\nallow_query_token = true"
    );
    let server = start_with_auth(&db, &auth, "").await;
    let secret = SECRET.as_bytes();
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(good().to_string().as_bytes())
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", "not-a-jwt".into(), "token_malformed"),
        ("two parts", "a.b".into(), "token_malformed"),
        (
            "wrong signature",
            hs(
                Algorithm::HS256,
                &good(),
                b"another-secret-another-secret-another-secret",
            ),
            "token_bad_signature",
        ),
        ("alg none", alg_none, "token_alg_not_allowed"),
        (
            "algorithm not allowed",
            hs(Algorithm::HS512, &good(), secret),
            "token_alg_not_allowed",
        ),
        (
            "expired",
            hs(
                Algorithm::HS256,
                &with(good(), json!({"exp": now() - 3600})),
                secret,
            ),
            "token_expired",
        ),
        (
            "not yet valid",
            hs(
                Algorithm::HS256,
                &with(good(), json!({"nbf": now() + 3600})),
                secret,
            ),
            "token_not_yet_valid",
        ),
        (
            "wrong issuer",
            hs(
                Algorithm::HS256,
                &with(good(), json!({"iss": "https://evil.example"})),
                secret,
            ),
            "token_bad_issuer",
        ),
        (
            "wrong audience",
            hs(
                Algorithm::HS256,
                &with(good(), json!({"aud": "someone-else"})),
                secret,
            ),
            "token_bad_audience",
        ),
        (
            "exp as a string",
            hs(
                Algorithm::HS256,
                &with(good(), json!({"exp": (now() + 600).to_string()})),
                secret,
            ),
            "token_bad_claims",
        ),
        (
            "no exp",
            hs(
                Algorithm::HS256,
                &json!({"sub": "c1", "iss": ISSUER, "aud": AUDIENCE}),
                secret,
            ),
            "token_bad_claims",
        ),
    ];
    let carriers = [
        Carrier::Header,
        Carrier::Subprotocol,
        Carrier::Query,
        Carrier::Message,
    ];
    let mut refusals = 0;
    for (name, tok, code) in &cases {
        for carrier in carriers {
            let got = present(&server, carrier, tok).await;
            assert_eq!(got, expected(carrier, code), "{name} via {carrier:?}");
            refusals += 1;
        }
    }
    // The good token passes on every carrier, so the refusals above are about the token.
    let tok = hs(Algorithm::HS256, &good(), secret);
    for carrier in carriers {
        assert_eq!(
            present(&server, carrier, &tok).await,
            Outcome::Welcome,
            "{carrier:?}"
        );
    }

    // Missing: an empty `auth` message is refused; a socket with no token at all is
    // upgraded (it may still authenticate in-band) and cut at the deadline (gateway.rs).
    assert_eq!(
        present(&server, Carrier::Message, "").await,
        Outcome::InBand("token_missing".into(), Some(4500))
    );
    refusals += 1;

    let counted = auth_failures(&server);
    assert_eq!(counted.values().sum::<u64>(), refusals, "{counted:?}");
    for reason in [
        "malformed",
        "bad_signature",
        "alg_not_allowed",
        "expired",
        "not_yet_valid",
        "bad_issuer",
        "bad_audience",
        "bad_claims",
        "missing",
    ] {
        assert!(
            counted.get(reason).copied().unwrap_or(0) > 0,
            "{reason}: {counted:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_token_is_ignored_unless_enabled() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nauth_deadline = \"300ms\"").await;
    // Not enabled: the query is not a carrier, so the socket waits for `auth` and times out.
    let tok = customer_token("c1");
    let mut c = Client::try_connect_url(&format!("{}?token={tok}", server.ws_url()), None, &[])
        .await
        .unwrap();
    assert_eq!(c.closed_with(Duration::from_secs(5)).await, Some(4502));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_jwks_refuse_key_confusion_foreign_keys_and_unknown_kids() {
    let db = Db::start().await;
    // RS256 with a PEM key.
    let pem_auth = format!(
        "algorithms = [\"RS256\"]\npublic_key_file = {:?}",
        fixture("rsa_public.pem")
    );
    let server = start_with_auth(&db, &pem_auth, "").await;
    let claims = json!({"sub": "c1", "exp": now() + 600});
    let public = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let cases = [
        (
            "HS256 signed with the RSA public key",
            hs(Algorithm::HS256, &claims, &public),
            "token_alg_not_allowed",
        ),
        (
            "HS256 signed with the trimmed public key",
            hs(
                Algorithm::HS256,
                &claims,
                String::from_utf8(public.clone()).unwrap().trim().as_bytes(),
            ),
            "token_alg_not_allowed",
        ),
        (
            "signed by another RSA key",
            rs256(None, &claims, "rsa2_private.pem"),
            "token_bad_signature",
        ),
        (
            "expired",
            rs256(
                None,
                &json!({"sub": "c1", "exp": now() - 3600}),
                "rsa_private.pem",
            ),
            "token_expired",
        ),
    ];
    for (name, tok, code) in &cases {
        for carrier in [Carrier::Header, Carrier::Subprotocol, Carrier::Message] {
            assert_eq!(
                present(&server, carrier, tok).await,
                expected(carrier, code),
                "{name} via {carrier:?}"
            );
        }
    }
    let tok = rs256(None, &claims, "rsa_private.pem");
    assert_eq!(
        present(&server, Carrier::Header, &tok).await,
        Outcome::Welcome
    );
    drop(server);

    // JWKS: the token's kid picks the key.
    let dir = tempfile::tempdir().unwrap();
    let ek =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&ek, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("rsa-1".into());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
    let server = start_with_auth(
        &db,
        &format!("algorithms = [\"RS256\"]\njwks_file = {jwks:?}"),
        "",
    )
    .await;
    let ok = rs256(Some("rsa-1"), &claims, "rsa_private.pem");
    assert_eq!(
        present(&server, Carrier::Header, &ok).await,
        Outcome::Welcome
    );
    let unknown = rs256(Some("rsa-9"), &claims, "rsa_private.pem");
    for carrier in [Carrier::Header, Carrier::Subprotocol, Carrier::Message] {
        assert_eq!(
            present(&server, carrier, &unknown).await,
            expected(carrier, "token_unknown_kid"),
            "{carrier:?}"
        );
    }
    // The right kid with the wrong key's signature.
    let forged = rs256(Some("rsa-1"), &claims, "rsa2_private.pem");
    assert_eq!(
        present(&server, Carrier::Header, &forged).await,
        Outcome::Refused(401, "token_bad_signature".into())
    );
}

/// Inserts an order for `customer` every 50 ms until `stop` fires.
fn order_writer(
    db: &Db,
    customers: &'static [&'static str],
) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let orders = db.coll("orders");
    let s = stop.clone();
    tokio::spawn(async move {
        let mut n = 0u32;
        while !s.is_cancelled() {
            for c in customers {
                let _ = orders
                    .insert_one(doc! {"customerId": *c, "storeId": "s1", "status": "new", "n": n})
                    .await;
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_mid_connection_closes_within_leeway_and_delivers_nothing_after() {
    let db = Db::start().await;
    let leeway = 1;
    let auth =
        format!("algorithms = [\"HS256\"]\nsecret_env = \"{SECRET_ENV}\"\nleeway = \"{leeway}s\"");
    let server = start_with_auth(&db, &auth, "").await;
    let exp = now() + 2;
    let short = token(json!({"sub": "c1", "role": "customer", "exp": exp}));
    let (mut c, _) = Client::connect(&server, &short).await;
    let (mut control, _) = Client::connect(&server, &customer_token("c2")).await;
    let writer = order_writer(&db, &["c1", "c2"]);

    let deadline_ms = (exp + leeway) as i64 * 1000;
    let mut before = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut c.ws))
            .await
            .expect("no close within 10 s")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "event", "{v}");
                let at = wall_ms();
                assert!(
                    at <= deadline_ms + 500,
                    "event delivered {} ms after exp + leeway",
                    at - deadline_ms
                );
                before += 1;
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                break f.map(|f| u16::from(f.code))
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    };
    let closed_at = wall_ms();
    assert_eq!(code, Some(4501));
    assert!(
        before > 0,
        "nothing was delivered while the token was valid"
    );
    // Not before `exp` (the token was valid until then), and within leeway plus scheduling slack.
    assert!(
        closed_at >= exp as i64 * 1000,
        "closed {} ms before exp",
        exp as i64 * 1000 - closed_at
    );
    assert!(
        closed_at <= deadline_ms + 1500,
        "closed {} ms after exp + leeway",
        closed_at - deadline_ms
    );

    // Events kept flowing after the cut-off: the control client, with a long token, sees newer ones.
    let mut after = 0;
    for e in control.events(200, Duration::from_secs(2)).await {
        if e["ts"].as_i64().unwrap() > deadline_ms {
            after += 1;
        }
    }
    writer.cancel();
    assert!(
        after > 0,
        "no events after the cut-off, so the test proved nothing"
    );
    let counted = auth_failures(&server);
    assert_eq!(counted.get("expired_in_session"), Some(&1), "{counted:?}");
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_token_before_expiry_keeps_the_connection() {
    let db = Db::start().await;
    let auth = format!("algorithms = [\"HS256\"]\nsecret_env = \"{SECRET_ENV}\"\nleeway = \"0s\"");
    let server = start_with_auth(&db, &auth, "").await;
    let exp = now() + 2;
    let (mut c, _) = Client::connect(&server, &token(json!({"sub": "c1", "exp": exp}))).await;

    // A refresh for another subject, or an invalid one, is refused without closing.
    c.send_json(json!({"type": "auth", "token": customer_token("c2")}))
        .await;
    let e = c.next_json().await;
    assert_eq!(e["code"], "subject_changed", "{e}");
    c.send_json(json!({"type": "auth", "token": token(json!({"sub": "c1", "exp": now() - 600}))}))
        .await;
    let e = c.next_json().await;
    assert_eq!(e["code"], "token_expired", "{e}");

    c.send_json(json!({"type": "auth", "token": customer_token("c1")}))
        .await;
    assert_eq!(c.next_json().await["type"], "authenticated");

    // Well past the first token's expiry the socket still delivers.
    let until = Instant::now() + Duration::from_secs(exp.saturating_sub(now()) + 1);
    while Instant::now() < until {
        c.send_json(json!({"type": "ping"})).await;
        assert_eq!(c.next_json().await["type"], "pong");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.coll("orders")
        .insert_one(doc! {"customerId": "c1", "storeId": "s1", "status": "new"})
        .await
        .unwrap();
    let evs = c.events(1, Duration::from_secs(10)).await;
    assert_eq!(evs.len(), 1, "the refreshed connection stopped delivering");
    assert_eq!(evs[0]["room"], "customer:c1");
}

/// The stores claim opens `store:` rooms only to staff and admin roles: a customer,
/// visitor or role-less token that carries `stores: [S]` neither auto-joins nor may
/// subscribe to `store:S`, and receives none of S's orders; staff with the same claim do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_claim_grants_store_rooms_only_to_staff_roles() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let mut outsiders = Vec::new();
    for (who, claims) in [
        (
            "customer",
            json!({"sub": "c9", "role": "customer", "stores": ["s1"]}),
        ),
        (
            "visitor",
            json!({"sub": "v9", "role": "visitor", "stores": ["s1"]}),
        ),
        ("no role", json!({"sub": "n9", "stores": ["s1"]})),
    ] {
        let (mut c, welcome) = Client::connect(&server, &token(claims)).await;
        let rooms = welcome["rooms"].to_string();
        assert!(!rooms.contains("store:s1"), "{who} auto-joined: {welcome}");
        let r = c.subscribe("store:s1", None).await;
        assert_eq!(r["code"], "forbidden", "{who}: {r}");
        outsiders.push((who, c));
    }
    let (mut staff, welcome) = Client::connect(&server, &store_token("owner-1", &["s1"])).await;
    assert!(
        welcome["rooms"].to_string().contains("store:s1"),
        "{welcome}"
    );
    db.coll("orders")
        .insert_one(
            doc! {"customerId": "c1", "storeId": "s1", "status": "new", "orderType": "pickup",
            "customerName": "Ada", "deliveryAddress": "1 Private Way"},
        )
        .await
        .unwrap();
    let got = staff.events(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "staff of s1 must still get its orders");
    for (who, c) in &mut outsiders {
        let leaked = c.events(1, Duration::from_millis(700)).await;
        assert!(leaked.is_empty(), "{who} received {leaked:?}");
    }
}
