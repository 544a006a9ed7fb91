//! `[auth]`: the table as written, spanned like every section, converted into [`AuthConfig`]; the key files are read by `crate::auth`.

use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;
use toml::Spanned;

use super::errors::{invalid_at, ConfigError, Ctx};
use super::values::{DurationOrZero, OneOrMany};
use crate::auth::{
    read_jwks, read_pem, AuthConfig, ClaimNames, Keys, DEFAULT_LEEWAY, DEFAULT_SECRET_ENV,
    DEFAULT_STORE_ROLES, MAX_LEEWAY,
};
use crate::authz::OrderLookupConfig;
use crate::idcodec::derive_id_material;

/// The `[auth]` table as written in TOML. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    /// Accepted signature algorithms, e.g. `["RS256"]`. Default `["HS256"]`.
    /// Never taken from the token; HS* and asymmetric ones cannot be mixed.
    algorithms: Option<Spanned<Vec<String>>>,
    /// Name of the env var holding the HMAC secret (raw bytes, not base64).
    /// Default `CHANGECAST_JWT_SECRET`; read only when an HS* algorithm is configured.
    secret_env: Option<Spanned<String>>,
    /// PEM public key (SPKI `PUBLIC KEY`, or `RSA PUBLIC KEY`) for RS*/PS*/ES*/EdDSA.
    public_key_file: Option<Spanned<PathBuf>>,
    /// JWKS JSON file (`{"keys":[…]}`); the token's `kid` selects the key.
    jwks_file: Option<Spanned<PathBuf>>,
    /// Accepted `iss` value(s). Unset: `iss` is not checked.
    issuer: Option<Spanned<OneOrMany>>,
    /// Accepted `aud` value(s). Unset: `aud` is not checked.
    audience: Option<Spanned<OneOrMany>>,
    /// Clock skew tolerated on `exp`/`nbf`, e.g. `"30s"`. Default 30s, at most 5m.
    leeway: Option<Spanned<DurationOrZero>>,
    /// Claim holding the subject (user id). Default `sub`.
    subject_claim: Option<Spanned<String>>,
    /// Claim holding the role (string or array of strings). Default `role`.
    role_claim: Option<Spanned<String>>,
    /// Claim holding the store ids (string, number, ObjectId or array of those). Default `stores`.
    /// Honoured only for tokens with an admin or store role; other tokens' store ids are ignored.
    stores_claim: Option<Spanned<String>>,
    /// Environment variable with the key material that seals event ids on the wire
    /// (at least 16 bytes; every replica must have the same). Default
    /// `CHANGECAST_ID_SECRET`; when it is unset, the key is derived from the HMAC JWT
    /// secret, and with asymmetric algorithms it is random per process.
    id_secret_env: Option<Spanned<String>>,
    /// Claim naming the watched database (tenant) the token belongs to. Default `db`.
    /// Read only when `mongodb.databases` lists more than one database: then every
    /// non-admin token must carry it, and sees that database's events and orders only.
    database_claim: Option<Spanned<String>>,
    /// Role values that make an admin. Default `["admin"]`.
    admin_roles: Option<Vec<String>>,
    /// Role values that make store staff. Default `["store", "store_owner", "seller", "staff"]`.
    store_roles: Option<Vec<String>>,
    /// Accept `?token=` on the upgrade request (browsers that cannot set
    /// headers; the URL may end up in proxy logs). Default false.
    allow_query_token: Option<bool>,
    /// Let clients without a token join `storefront:{id}` rooms. Default false.
    allow_anonymous_storefront: Option<bool>,
    /// How long an order's owners are cached for `order:{id}` checks, e.g. `"10s"`. Default 10s.
    order_cache_ttl: Option<Spanned<DurationOrZero>>,
    /// Most orders whose owners are cached at once. Default 10000.
    order_cache_capacity: Option<Spanned<usize>>,
    /// Deadline for one order-owner lookup in MongoDB, e.g. `"2s"`. Default 2s.
    order_lookup_timeout: Option<Spanned<DurationOrZero>>,
}

/// The error of `auth.{key}`, at its value when the file sets it.
fn err(
    ctx: &Ctx<'_>,
    key: &str,
    span: Option<Range<usize>>,
    msg: impl Into<String>,
) -> ConfigError {
    let key = format!("auth.{key}");
    match span {
        Some(span) => invalid_at(ctx.text, ctx.origin, key, span, msg),
        None => ctx.err_nospan(key, msg),
    }
}

fn span_of<T>(v: &Option<Spanned<T>>) -> Option<Range<usize>> {
    v.as_ref().map(Spanned::span)
}

/// Converts `[auth]`, reading the key files and the environment variables it names;
/// `databases` are the watched ones (`mongodb.databases`).
pub(super) fn convert(
    ctx: &Ctx<'_>,
    raw: RawAuth,
    databases: &[String],
) -> Result<AuthConfig, ConfigError> {
    let algorithms_at = span_of(&raw.algorithms);
    let algorithms = algorithms(ctx, raw.algorithms)?;
    let hmac = algorithms
        .iter()
        .any(|a| a.family() == AlgorithmFamily::Hmac);
    let keys = if hmac {
        // Mixing would let a token pick HS256 and be checked against a
        // public key used as the HMAC secret (algorithm confusion).
        if algorithms
            .iter()
            .any(|a| a.family() != AlgorithmFamily::Hmac)
        {
            return Err(err(
                ctx,
                "algorithms",
                algorithms_at,
                "HS* and asymmetric algorithms cannot be mixed (key confusion)",
            ));
        }
        if let Some(p) = &raw.public_key_file {
            return Err(err(
                ctx,
                "public_key_file",
                Some(p.span()),
                "a public key is only used with RS*/PS*/ES*/EdDSA algorithms",
            ));
        }
        if let Some(p) = &raw.jwks_file {
            return Err(err(
                ctx,
                "jwks_file",
                Some(p.span()),
                "a JWKS is only used with RS*/PS*/ES*/EdDSA algorithms",
            ));
        }
        let at = span_of(&raw.secret_env);
        let var = raw
            .secret_env
            .as_ref()
            .map_or(DEFAULT_SECRET_ENV, |v| v.get_ref().as_str());
        if var.is_empty() {
            return Err(err(
                ctx,
                "secret_env",
                at,
                "must name an environment variable",
            ));
        }
        let secret = match (ctx.env)(var) {
            Some(v) if !v.is_empty() => v,
            _ => {
                return Err(err(
                    ctx,
                    "secret_env",
                    at,
                    format!("environment variable {var} is missing or empty"),
                ))
            }
        };
        Keys::hmac(var, &secret.into_encoded_bytes())
    } else {
        if let Some(v) = &raw.secret_env {
            return Err(err(
                ctx,
                "secret_env",
                Some(v.span()),
                "a secret is only used with HS* algorithms",
            ));
        }
        let mut families: Vec<AlgorithmFamily> = Vec::new();
        for a in &algorithms {
            if !families.contains(&a.family()) {
                families.push(a.family());
            }
        }
        let pem = match &raw.public_key_file {
            Some(path) => read_pem(path.get_ref(), &families)
                .map_err(|m| err(ctx, "public_key_file", Some(path.span()), m))?,
            None => Vec::new(),
        };
        let jwks = match &raw.jwks_file {
            Some(path) => read_jwks(path.get_ref(), &families)
                .map_err(|m| err(ctx, "jwks_file", Some(path.span()), m))?,
            None => Vec::new(),
        };
        if pem.is_empty() && jwks.is_empty() {
            // Neither file is written: the algorithms are what asks for one.
            return Err(err(
                ctx,
                "public_key_file",
                algorithms_at,
                "asymmetric algorithms need auth.public_key_file or auth.jwks_file",
            ));
        }
        Keys::Asymmetric { pem, jwks }
    };

    let leeway = match raw.leeway {
        Some(v) if v.get_ref().0 > MAX_LEEWAY => {
            return Err(err(ctx, "leeway", Some(v.span()), "must be at most 5m"))
        }
        Some(v) => v.into_inner().0,
        None => DEFAULT_LEEWAY,
    };

    let issuer = non_empty_list(ctx, "issuer", raw.issuer)?;
    let audience = non_empty_list(ctx, "audience", raw.audience)?;
    let claim = |key: &str, v: Option<Spanned<String>>, default: &str| match v {
        Some(s) if s.get_ref().is_empty() => {
            Err(err(ctx, key, Some(s.span()), "must not be empty"))
        }
        Some(s) => Ok(s.into_inner()),
        None => Ok(default.to_owned()),
    };
    let claims = ClaimNames {
        subject: claim("subject_claim", raw.subject_claim, "sub")?,
        role: claim("role_claim", raw.role_claim, "role")?,
        stores: claim("stores_claim", raw.stores_claim, "stores")?,
        database: claim("database_claim", raw.database_claim, "db")?,
    };

    let id_at = span_of(&raw.id_secret_env);
    let id_var = raw
        .id_secret_env
        .as_ref()
        .map_or(crate::idcodec::ID_SECRET_ENV, |v| v.get_ref().as_str());
    if id_var.is_empty() {
        return Err(err(
            ctx,
            "id_secret_env",
            id_at,
            "must name an environment variable",
        ));
    }
    let id_material = match (ctx.env)(id_var) {
        Some(v) if !v.is_empty() => {
            let v = v.into_encoded_bytes();
            if v.len() < crate::idcodec::MIN_SECRET_LEN {
                return Err(err(
                    ctx,
                    "id_secret_env",
                    id_at,
                    format!(
                        "{id_var} must hold at least {} bytes",
                        crate::idcodec::MIN_SECRET_LEN
                    ),
                ));
            }
            Some(derive_id_material(&v))
        }
        _ => None,
    };

    let defaults = OrderLookupConfig::default();
    let order_lookup = OrderLookupConfig {
        ttl: raw
            .order_cache_ttl
            .map_or(defaults.ttl, |v| v.into_inner().0),
        capacity: match raw.order_cache_capacity {
            Some(n) => std::num::NonZeroUsize::new(*n.get_ref()).ok_or_else(|| {
                err(
                    ctx,
                    "order_cache_capacity",
                    Some(n.span()),
                    "must be at least 1",
                )
            })?,
            None => defaults.capacity,
        },
        timeout: match raw.order_lookup_timeout {
            Some(v) if v.get_ref().0.is_zero() => {
                return Err(err(
                    ctx,
                    "order_lookup_timeout",
                    Some(v.span()),
                    "must be more than 0",
                ))
            }
            Some(v) => v.into_inner().0,
            None => defaults.timeout,
        },
    };

    Ok(AuthConfig {
        algorithms,
        keys,
        issuer,
        audience,
        leeway,
        claims,
        admin_roles: raw.admin_roles.unwrap_or_else(|| vec!["admin".to_owned()]),
        store_roles: raw
            .store_roles
            .unwrap_or_else(|| DEFAULT_STORE_ROLES.map(str::to_owned).to_vec()),
        allow_query_token: raw.allow_query_token.unwrap_or(false),
        allow_anonymous_storefront: raw.allow_anonymous_storefront.unwrap_or(false),
        order_lookup,
        id_material,
        databases: databases.to_vec(),
    })
}

/// The pinned algorithms; `HS256` when unset.
fn algorithms(
    ctx: &Ctx<'_>,
    raw: Option<Spanned<Vec<String>>>,
) -> Result<Vec<Algorithm>, ConfigError> {
    let Some(names) = raw else {
        return Ok(vec![Algorithm::HS256]);
    };
    let at = Some(names.span());
    let mut out = Vec::new();
    for name in names.get_ref() {
        if name.eq_ignore_ascii_case("none") {
            return Err(err(ctx, "algorithms", at, "\"none\" is never accepted"));
        }
        let alg = Algorithm::from_str(name).map_err(|_| {
            err(
                ctx,
                "algorithms",
                at.clone(),
                format!("unknown algorithm {name:?}"),
            )
        })?;
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    if out.is_empty() {
        return Err(err(
            ctx,
            "algorithms",
            at,
            "must name at least one algorithm",
        ));
    }
    Ok(out)
}

fn non_empty_list(
    ctx: &Ctx<'_>,
    key: &str,
    v: Option<Spanned<OneOrMany>>,
) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(v) = v else {
        return Ok(None);
    };
    let span = v.span();
    let list = v.into_inner().0;
    if list.is_empty() || list.iter().any(String::is_empty) {
        return Err(err(
            ctx,
            key,
            Some(span),
            "must be a non-empty string or list of non-empty strings",
        ));
    }
    Ok(Some(list))
}

/// Masks values of keys that look secret (secret, password, token, key material), for the echo of `[auth]` in `check-config`.
pub(super) fn mask_table(t: &toml::Table) -> toml::Table {
    t.iter()
        .map(|(k, v)| {
            let lk = k.to_ascii_lowercase();
            let secret = ["secret", "password", "token", "private", "credential"]
                .iter()
                .any(|w| lk.contains(w));
            let v = match v {
                toml::Value::Table(inner) => toml::Value::Table(mask_table(inner)),
                _ if secret => toml::Value::String("***".into()),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}
