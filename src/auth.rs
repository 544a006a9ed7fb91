//! JWT verification into a principal, and where a connection's token comes from; knows nothing of sockets or who may join which room.
//!
//! `crate::config` converts the `[auth]` table once into [`AuthConfig`],
//! reading the key files with [`read_pem`] and [`read_jwks`] and the secret
//! there, so a bad key fails at startup, not at the first client. [`Verifier::verify`] is pure apart from the clock it is handed.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::authz::OrderLookupConfig;
use crate::metrics::{Metrics, ReasonLabels};
use crate::room::Room;

/// Env var read for the HMAC secret when `auth.secret_env` is not set.
pub(crate) const DEFAULT_SECRET_ENV: &str = "CHANGECAST_JWT_SECRET";
/// Shorter HMAC secrets are accepted with a warning: RFC 7518 §3.2 asks for
/// a key at least as long as the hash output (32 bytes for HS256).
pub(crate) const MIN_SECRET_LEN: usize = 32;
/// Longest token looked at; a real JWT is a few hundred bytes, and this caps
/// the base64 and JSON work an unauthenticated peer can ask for.
pub(crate) const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Most store ids one token may carry; each becomes an auto-joined room.
pub(crate) const MAX_STORES_PER_TOKEN: usize = 1024;
/// Largest accepted `auth.leeway`; more than this hides broken clocks.
pub(crate) const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Latest `exp`/`nbf` accepted (9999-12-31T23:59:59Z), so callers can add
/// leeway or compute deadlines without overflowing `SystemTime`.
const MAX_NUMERIC_DATE: f64 = 253_402_300_799.0;
/// Default `auth.leeway`: tolerated clock skew between issuer and us.
pub(crate) const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// The subprotocol a WebSocket client offers (and the server echoes) to say
/// "changecast native protocol, version 1". See [`token_from_headers`].
pub(crate) const SUBPROTOCOL: &str = "changecast.v1";
/// Prefix of the subprotocol value that carries the token: `bearer.<jwt>`.
pub(crate) const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// Default `auth.store_roles`.
pub(crate) const DEFAULT_STORE_ROLES: [&str; 4] = ["store", "store_owner", "seller", "staff"];

/// Names of the claims a principal is read from (dotted paths allowed, e.g.
/// `app_metadata.stores`; a literal key containing dots wins over a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimNames {
    /// Subject claim, default `sub`.
    pub(crate) subject: String,
    /// Role claim, default `role`.
    pub(crate) role: String,
    /// Store-ids claim, default `stores`.
    pub(crate) stores: String,
    /// Database (tenant) claim, default `db`; read only when several databases are watched.
    pub(crate) database: String,
}

/// Typed auth settings. Holds the verification keys; its `Debug` never
/// prints the HMAC secret.
#[derive(Clone)]
pub struct AuthConfig {
    /// Pinned algorithms, non-empty, all HMAC or all asymmetric.
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) keys: Keys,
    /// Accepted issuers (`None`: not checked).
    pub(crate) issuer: Option<Vec<String>>,
    /// Accepted audiences (`None`: not checked).
    pub(crate) audience: Option<Vec<String>>,
    /// Tolerated clock skew on `exp` and `nbf`.
    pub(crate) leeway: Duration,
    /// Where the principal's fields come from.
    pub(crate) claims: ClaimNames,
    /// Role values that make an admin.
    pub(crate) admin_roles: Vec<String>,
    /// Role values that make store staff.
    pub(crate) store_roles: Vec<String>,
    /// Whether `?token=` is looked at.
    pub allow_query_token: bool,
    /// Whether anonymous clients may join storefront rooms.
    pub(crate) allow_anonymous_storefront: bool,
    /// Cache and deadline of `order:{id}` ownership lookups.
    pub(crate) order_lookup: OrderLookupConfig,
    /// Key material for wire ids read from `auth.id_secret_env` (a one-way derivation).
    pub(crate) id_material: Option<[u8; 32]>,
    /// The watched databases (`mongodb.databases`), set by the config loader. With
    /// more than one, tokens are scoped to one of them by [`ClaimNames::database`].
    pub(crate) databases: Vec<String>,
}

/// Verification keys, chosen by algorithm family at config time.
#[derive(Clone)]
pub(crate) enum Keys {
    /// HS* only. The secret lives inside the `DecodingKey`; `id_material` is a
    /// one-way derivation of it for the wire-id key (see `idcodec`), never the secret.
    Hmac {
        key: DecodingKey,
        secret_len: usize,
        id_material: [u8; 32],
    },
    /// RS*/PS*/ES*/EdDSA: a PEM key per configured family, and JWKS keys.
    Asymmetric {
        pem: Vec<(AlgorithmFamily, DecodingKey)>,
        jwks: Vec<JwksKey>,
    },
}

#[derive(Clone)]
pub(crate) struct JwksKey {
    kid: Option<String>,
    family: AlgorithmFamily,
    /// The JWK's own `alg`, when it states one: the token must then use exactly it.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

use crate::idcodec::derive_id_material;

impl Keys {
    /// The key of an HMAC secret read from the environment variable `var`.
    pub(crate) fn hmac(var: &str, secret: &[u8]) -> Self {
        if secret.len() < MIN_SECRET_LEN {
            tracing::warn!(
                env = var,
                len = secret.len(),
                min = MIN_SECRET_LEN,
                "jwt hmac secret is shorter than recommended"
            );
        }
        Keys::Hmac {
            key: DecodingKey::from_secret(secret),
            secret_len: secret.len(),
            id_material: derive_id_material(secret),
        }
    }
}

impl AuthConfig {
    /// Key material for sealing wire ids that every replica derives alike: from
    /// `auth.id_secret_env` when set, else from the HMAC JWT secret; `None` with
    /// asymmetric keys and no id secret (public keys cannot key a secret).
    pub(crate) fn shared_id_material(&self) -> Option<([u8; 32], crate::idcodec::KeySource)> {
        if let Some(m) = self.id_material {
            return Some((m, crate::idcodec::KeySource::IdSecret));
        }
        match &self.keys {
            Keys::Hmac { id_material, .. } => {
                Some((*id_material, crate::idcodec::KeySource::JwtSecret))
            }
            Keys::Asymmetric { .. } => None,
        }
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keys::Hmac { secret_len, .. } => f
                .debug_struct("Hmac")
                .field("secret", &format_args!("<redacted {secret_len} bytes>"))
                .finish(),
            Keys::Asymmetric { pem, jwks } => f
                .debug_struct("Asymmetric")
                .field("pem", &pem.iter().map(|(fam, _)| *fam).collect::<Vec<_>>())
                .field(
                    "jwks_kids",
                    &jwks.iter().map(|k| k.kid.as_deref()).collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("algorithms", &self.algorithms)
            .field("keys", &self.keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("claims", &self.claims)
            .field("admin_roles", &self.admin_roles)
            .field("store_roles", &self.store_roles)
            .field("allow_query_token", &self.allow_query_token)
            .field(
                "allow_anonymous_storefront",
                &self.allow_anonymous_storefront,
            )
            .field("order_lookup", &self.order_lookup)
            .finish()
    }
}

fn family_name(f: AlgorithmFamily) -> &'static str {
    match f {
        AlgorithmFamily::Hmac => "HMAC",
        AlgorithmFamily::Rsa => "RSA",
        AlgorithmFamily::Ec => "EC",
        AlgorithmFamily::Ed => "Ed25519",
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Parses the PEM once for every configured asymmetric family: an SPKI
/// `PUBLIC KEY` does not say which family it is, and a key that fits none of
/// the configured algorithms is a startup error rather than a refused client.
/// Errors are messages about `auth.public_key_file`.
pub(crate) fn read_pem(
    path: &Path,
    families: &[AlgorithmFamily],
) -> Result<Vec<(AlgorithmFamily, DecodingKey)>, String> {
    let bytes = read_file(path)?;
    let mut out = Vec::new();
    for &family in families {
        let parsed = match family {
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&bytes),
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&bytes),
            AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&bytes),
            AlgorithmFamily::Hmac => continue,
        };
        match parsed {
            Ok(k) => out.push((family, k)),
            Err(e) => {
                return Err(format!(
                    "{} is not a valid {} public key: {e}",
                    path.display(),
                    family_name(family)
                ))
            }
        }
    }
    Ok(out)
}

fn jwk_family(jwk: &Jwk) -> AlgorithmFamily {
    match jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
        AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
        AlgorithmParameters::OctetKey(_) => AlgorithmFamily::Hmac,
    }
}

/// Reads a JWKS, keeping the signature keys of the configured families.
/// Keys of other families or for encryption are skipped with a log line
/// (real JWKS files often carry both); a set left empty is an error. Errors are
/// messages about `auth.jwks_file`.
pub(crate) fn read_jwks(path: &Path, families: &[AlgorithmFamily]) -> Result<Vec<JwksKey>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let bytes = read_file(path)?;
    let set: RawSet = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a JWKS document: {e}", path.display()))?;
    let mut out: Vec<JwksKey> = Vec::new();
    for (i, value) in set.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(index = i, error = %e, "skipping unsupported jwks key");
                continue;
            }
        };
        let kid = jwk.common.key_id.clone();
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
        ) {
            tracing::info!(index = i, kid = ?kid, "skipping jwks key not meant for signatures");
            continue;
        }
        let family = jwk_family(&jwk);
        if family == AlgorithmFamily::Hmac {
            return Err(format!(
                "key {i} is symmetric (oct); only public keys are accepted"
            ));
        }
        if !families.contains(&family) {
            tracing::info!(index = i, kid = ?kid, family = family_name(family), "skipping jwks key of an unconfigured family");
            continue;
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(ka) => match Algorithm::from_str(&ka.to_string()) {
                Ok(a) if a.family() == family => Some(a),
                Ok(_) => return Err(format!("key {i} has an alg that does not fit its key type")),
                // An encryption alg (RSA-OAEP…) without `use: enc`.
                Err(_) => {
                    tracing::info!(index = i, kid = ?kid, "skipping jwks key with a non-signature alg");
                    continue;
                }
            },
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("key {i} is invalid: {e}"))?;
        if out.iter().any(|k| k.kid == kid) {
            return Err(format!(
                "key {i} repeats a kid (or a second key without kid)"
            ));
        }
        out.push(JwksKey {
            kid,
            family,
            alg,
            key,
        });
    }
    if out.is_empty() {
        return Err(format!(
            "{} holds no signature key for the configured algorithms",
            path.display()
        ));
    }
    Ok(out)
}

/// Why a token was refused. Messages never contain the token or its contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("no token was presented")]
    Missing,
    /// Not a compact JWS, bad base64/JSON, or too long.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// The signature does not verify with the selected key.
    #[error("token signature is invalid")]
    BadSignature,
    /// The header's `alg` is not one of the pinned algorithms (`none` included).
    #[error("token algorithm is not allowed")]
    AlgNotAllowed,
    /// `exp` (plus leeway) has passed.
    #[error("token has expired")]
    Expired,
    /// `nbf` (minus leeway) is still ahead.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is missing or not an accepted issuer.
    #[error("token issuer is not accepted")]
    BadIssuer,
    /// `aud` is missing or not an accepted audience.
    #[error("token audience is not accepted")]
    BadAudience,
    /// No configured key matches the token's `kid`.
    #[error("token key id is unknown")]
    UnknownKid,
    /// A required claim is missing or has the wrong type; names the claim.
    #[error("token claims are invalid: {0}")]
    BadClaims(String),
}

impl AuthError {
    /// Stable machine code sent to clients, e.g. `token_expired`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "token_missing",
            AuthError::Malformed(_) => "token_malformed",
            AuthError::BadSignature => "token_bad_signature",
            AuthError::AlgNotAllowed => "token_alg_not_allowed",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadIssuer => "token_bad_issuer",
            AuthError::BadAudience => "token_bad_audience",
            AuthError::UnknownKid => "token_unknown_kid",
            AuthError::BadClaims(_) => "token_bad_claims",
        }
    }

    /// Every value [`AuthError::reason`] gives (metrics export them from the start).
    pub(crate) const REASONS: [&'static str; 10] = [
        "missing",
        "malformed",
        "bad_signature",
        "alg_not_allowed",
        "expired",
        "not_yet_valid",
        "bad_issuer",
        "bad_audience",
        "unknown_kid",
        "bad_claims",
    ];

    /// Short fixed label for `changecast_auth_failures{reason}`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::AlgNotAllowed => "alg_not_allowed",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadIssuer => "bad_issuer",
            AuthError::BadAudience => "bad_audience",
            AuthError::UnknownKid => "unknown_kid",
            AuthError::BadClaims(_) => "bad_claims",
        }
    }

    /// Counts this failure in `auth_failures`.
    pub(crate) fn record(&self, metrics: &Metrics) {
        metrics
            .auth_failures
            .get_or_create(&ReasonLabels {
                reason: self.reason(),
            })
            .inc();
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The subject claim; `None` only for an anonymous storefront visitor.
    /// 24-hex ObjectId strings are lowercased so they compare with ids read from MongoDB.
    pub subject: Option<String>,
    /// The role the principal acts as (for arrays: the first admin role, else
    /// the first store role, else the first value).
    pub(crate) role: Option<String>,
    /// Store ids from the stores claim, deduplicated, order kept, ObjectId hex lowercased.
    pub(crate) stores: Vec<String>,
    /// A role is one of `auth.admin_roles`.
    pub(crate) is_admin: bool,
    /// A role is one of `auth.store_roles`.
    pub(crate) is_store_staff: bool,
    /// The token's `exp` (without leeway; see [`Verifier::leeway`]). `None` for anonymous.
    pub(crate) expires_at: Option<SystemTime>,
    /// The watched database the token is scoped to, when several are watched
    /// (`auth.database_claim`); `None`: one database, or an admin of all of them.
    pub(crate) database: Option<String>,
}

impl Principal {
    /// A client without a token (in tests: the base of principals built by hand).
    #[cfg(test)]
    pub(crate) fn anonymous() -> Self {
        Self {
            subject: None,
            role: None,
            stores: Vec::new(),
            is_admin: false,
            is_store_staff: false,
            expires_at: None,
            database: None,
        }
    }

    /// Rooms joined on connect, each of which [`crate::authz::Authorizer::may_join`] allows:
    ///
    /// - `admin` for admins;
    /// - `store:{id}` for each store id;
    /// - `customer:{sub}` unless the principal is an admin or store staff.
    ///
    /// Admins and staff skip `customer:{sub}` on purpose: an admin already
    /// receives every event through `admin`, and a staff dashboard should show
    /// the stores' events, not the staff member's own purchases (which would
    /// also arrive twice when they buy from their own store). Either may still
    /// `subscribe` to their own customer room explicitly.
    /// Ids that are not valid room ids are skipped, never mangled.
    pub(crate) fn auto_rooms(&self) -> Vec<Room> {
        let mut rooms = Vec::new();
        if self.is_admin {
            rooms.push(Room::admin());
        }
        rooms.extend(self.stores.iter().filter_map(|id| Room::store(id).ok()));
        if !self.is_admin && !self.is_store_staff {
            if let Some(room) = self.subject.as_deref().and_then(|s| Room::customer(s).ok()) {
                rooms.push(room);
            }
        }
        rooms
    }
}

/// Lowercases 24-hex ObjectId strings so a token's `"65F0…"` and MongoDB's
/// `ObjectId("65f0…").to_hex()` name the same room; other ids are kept as-is.
pub(crate) fn normalize_id(id: &str) -> String {
    if id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        id.to_ascii_lowercase()
    } else {
        id.to_owned()
    }
}

/// Verifies tokens against one [`AuthConfig`]. Cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct Verifier {
    algorithms: Vec<Algorithm>,
    keys: Keys,
    issuer: Option<Vec<String>>,
    audience: Option<Vec<String>>,
    leeway: Duration,
    claims: ClaimNames,
    admin_roles: HashSet<String>,
    store_roles: HashSet<String>,
    /// Watched databases when there are several (tokens are then scoped to one); empty otherwise.
    tenants: Vec<String>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.algorithms)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// The fields of the JOSE header we act on; parsed by hand so that an
/// `alg` outside jsonwebtoken's enum (`none`, `HS1`) is reported as
/// "not allowed" rather than "malformed".
struct JoseHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl Verifier {
    /// Builds a verifier from the typed config.
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            algorithms: config.algorithms.clone(),
            keys: config.keys.clone(),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway: config.leeway,
            claims: config.claims.clone(),
            admin_roles: config.admin_roles.iter().cloned().collect(),
            store_roles: config.store_roles.iter().cloned().collect(),
            tenants: if config.databases.len() > 1 {
                config.databases.clone()
            } else {
                Vec::new()
            },
        }
    }

    /// The tolerated clock skew: a connection should be closed once
    /// `principal.expires_at + leeway` has passed.
    pub(crate) fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Verifies `token` (the bare JWT, without `Bearer `) at time `now`.
    ///
    /// Order matters: the header's `alg` is checked against the pinned list
    /// before any key is touched, the signature before any claim, and times
    /// are checked against `now` (not the library's clock) so expiry is
    /// deterministic in tests and consistent with the caller's timers.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Principal, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("token is too long"));
        }
        let header = self.parse_header(token)?;
        let key = self.select_key(&header)?;

        let mut validation = Validation::new(header.alg);
        // `alg` is already known to be pinned; listing only it keeps
        // jsonwebtoken's same-family check from tripping on RS256+ES256 configs.
        validation.algorithms = vec![header.alg];
        let mut required = vec!["exp"];
        // Times are checked below against `now`.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(iss);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(aud);
                validation.validate_aud = true;
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);

        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
            .map_err(|e| map_jwt_error(e.kind()))?;
        let claims = data.claims;

        let exp = claim_time(&claims, "exp")?.ok_or_else(|| bad_claim("exp", "is missing"))?;
        if now >= exp.checked_add(self.leeway).unwrap_or(exp) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = claim_time(&claims, "nbf")? {
            if now.checked_add(self.leeway).unwrap_or(now) < nbf {
                return Err(AuthError::NotYetValid);
            }
        }
        self.principal(&claims, exp)
    }

    fn parse_header(&self, token: &str) -> Result<JoseHeader, AuthError> {
        let mut parts = token.split('.');
        let (Some(h), Some(_payload), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("not three dot-separated parts"));
        };
        let bytes = b64url_decode(h).ok_or(AuthError::Malformed("header is not base64url"))?;
        let header: Map<String, Value> = serde_json::from_slice(&bytes)
            .map_err(|_| AuthError::Malformed("header is not a JSON object"))?;
        let alg = match header.get("alg") {
            Some(Value::String(s)) => s,
            _ => return Err(AuthError::Malformed("header has no alg")),
        };
        let alg = Algorithm::from_str(alg).map_err(|_| AuthError::AlgNotAllowed)?;
        if !self.algorithms.contains(&alg) {
            return Err(AuthError::AlgNotAllowed);
        }
        // RFC 7515 §4.1.11: extensions we do not understand must be refused.
        if header.contains_key("crit") {
            return Err(AuthError::Malformed(
                "critical header extensions are not supported",
            ));
        }
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(AuthError::Malformed("kid is not a string")),
        };
        Ok(JoseHeader { alg, kid })
    }

    /// Picks the key for a token: the JWKS entry named by `kid`; else the PEM
    /// key of the algorithm's family; else, without `kid`, the only JWKS key
    /// of that family.
    fn select_key(&self, h: &JoseHeader) -> Result<&DecodingKey, AuthError> {
        let family = h.alg.family();
        match &self.keys {
            Keys::Hmac { key, .. } => Ok(key),
            Keys::Asymmetric { pem, jwks } => {
                if let Some(kid) = &h.kid {
                    if let Some(k) = jwks.iter().find(|k| k.kid.as_ref() == Some(kid)) {
                        return check_jwk(k, h.alg);
                    }
                }
                if let Some((_, key)) = pem.iter().find(|(f, _)| *f == family) {
                    return Ok(key);
                }
                if h.kid.is_none() {
                    let mut same = jwks.iter().filter(|k| k.family == family);
                    if let (Some(k), None) = (same.next(), same.next()) {
                        return check_jwk(k, h.alg);
                    }
                }
                Err(AuthError::UnknownKid)
            }
        }
    }

    fn principal(
        &self,
        claims: &Map<String, Value>,
        exp: SystemTime,
    ) -> Result<Principal, AuthError> {
        let sub_name = &self.claims.subject;
        let subject = match lookup_claim(claims, sub_name) {
            None | Some(Value::Null) => return Err(bad_claim(sub_name, "is missing")),
            Some(Value::String(s)) if !s.is_empty() => normalize_id(s),
            Some(Value::String(_)) => return Err(bad_claim(sub_name, "is empty")),
            Some(_) => return Err(bad_claim(sub_name, "must be a string")),
        };

        let role_name = &self.claims.role;
        let roles: Vec<&str> = match lookup_claim(claims, role_name) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad_claim(role_name, "must hold strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(bad_claim(
                    role_name,
                    "must be a string or a list of strings",
                ))
            }
        };
        let admin = roles.iter().find(|r| self.admin_roles.contains(**r));
        let staff = roles.iter().find(|r| self.store_roles.contains(**r));
        let role = admin.or(staff).or(roles.first()).map(|r| (*r).to_owned());

        let stores_name = &self.claims.stores;
        let mut stores: Vec<String> = Vec::new();
        match lookup_claim(claims, stores_name) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                if items.len() > MAX_STORES_PER_TOKEN {
                    return Err(bad_claim(stores_name, "lists too many stores"));
                }
                for item in items {
                    if let Some(id) = store_id(item).map_err(|m| bad_claim(stores_name, m))? {
                        if !stores.contains(&id) {
                            stores.push(id);
                        }
                    }
                }
            }
            Some(v) => {
                if let Some(id) = store_id(v).map_err(|m| bad_claim(stores_name, m))? {
                    stores.push(id);
                }
            }
        }

        // The stores claim grants `store:` rooms (other customers' names and addresses)
        // only to roles configured as staff or admin: an app that puts `stores` in a
        // customer's or visitor's token (a favourite shop, a last-visited store) must not
        // open those stores' rooms to them.
        if admin.is_none() && staff.is_none() {
            stores.clear();
        }

        // Several databases are several tenants whose ids may overlap (customer "c1" in
        // each): a token names its tenant, and sees nothing of the others. Admins
        // without the claim see every database.
        let database = if self.tenants.is_empty() {
            None
        } else {
            let name = &self.claims.database;
            match lookup_claim(claims, name) {
                None | Some(Value::Null) if admin.is_some() => None,
                None | Some(Value::Null) => {
                    return Err(bad_claim(
                        name,
                        "is missing (several databases are watched: the token must name its own)",
                    ))
                }
                Some(Value::String(s)) if self.tenants.iter().any(|t| t == s) => Some(s.clone()),
                Some(Value::String(_)) => return Err(bad_claim(name, "names no watched database")),
                Some(_) => return Err(bad_claim(name, "must be a string")),
            }
        };
        Ok(Principal {
            subject: Some(subject),
            role,
            stores,
            is_admin: admin.is_some(),
            is_store_staff: staff.is_some(),
            expires_at: Some(exp),
            database,
        })
    }
}

fn check_jwk(k: &JwksKey, alg: Algorithm) -> Result<&DecodingKey, AuthError> {
    // A key of another family, or one whose JWK pins a different alg, can
    // never verify this token; say so without trying.
    if k.family != alg.family() || k.alg.is_some_and(|a| a != alg) {
        return Err(AuthError::BadSignature);
    }
    Ok(&k.key)
}

fn bad_claim(name: &str, what: &str) -> AuthError {
    AuthError::BadClaims(format!("{name} {what}"))
}

/// One store id: a string, an integer, or Extended JSON `{"$oid": …}`.
/// Empty strings are `None` (legacy tokens carry `""` for "no store").
fn store_id(v: &Value) -> Result<Option<String>, &'static str> {
    match v {
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(normalize_id(s))),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Value::Object(o) => match (o.len(), o.get("$oid")) {
            (1, Some(Value::String(s))) if !s.is_empty() => Ok(Some(normalize_id(s))),
            _ => Err("holds an object that is not an ObjectId"),
        },
        _ => Err("must hold strings, integers or ObjectIds"),
    }
}

/// Finds a claim by literal name, else by dotted path into nested objects.
fn lookup_claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut cur = claims.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

/// A NumericDate claim (seconds since the epoch, fractions allowed).
fn claim_time(claims: &Map<String, Value>, name: &str) -> Result<Option<SystemTime>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let secs = n
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| bad_claim(name, "must be a non-negative number"))?;
            if secs > MAX_NUMERIC_DATE {
                return Err(bad_claim(name, "is out of range"));
            }
            let d = Duration::try_from_secs_f64(secs)
                .map_err(|_| bad_claim(name, "is out of range"))?;
            UNIX_EPOCH
                .checked_add(d)
                .map(Some)
                .ok_or_else(|| bad_claim(name, "is out of range"))
        }
        Some(_) => Err(bad_claim(name, "must be a number")),
    }
}

fn map_jwt_error(kind: &jsonwebtoken::errors::ErrorKind) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature
        | K::InvalidEcdsaKey
        | K::InvalidEddsaKey
        | K::InvalidRsaKey(_)
        | K::InvalidKeyFormat => AuthError::BadSignature,
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
            AuthError::AlgNotAllowed
        }
        K::MissingRequiredClaim(c) if c == "iss" => AuthError::BadIssuer,
        K::MissingRequiredClaim(c) if c == "aud" => AuthError::BadAudience,
        // jsonwebtoken reports a present-but-unparsable `exp` as missing.
        K::MissingRequiredClaim(c) | K::InvalidClaimFormat(c) => {
            AuthError::BadClaims(format!("{c} is missing or not a number"))
        }
        K::ExpiredSignature => AuthError::Expired,
        K::ImmatureSignature => AuthError::NotYetValid,
        K::InvalidIssuer => AuthError::BadIssuer,
        K::InvalidAudience => AuthError::BadAudience,
        K::InvalidSubject => AuthError::BadClaims("sub is not accepted".to_owned()),
        K::Base64(_) => AuthError::Malformed("not base64url"),
        K::Json(_) | K::Utf8(_) => AuthError::Malformed("payload is not a JSON object"),
        _ => AuthError::Malformed("not a valid JWT"),
    }
}

/// Decodes unpadded base64url (RFC 7515 §2). `None` on any other byte.
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// A bearer token as received. `Debug` is redacted so it cannot reach a log
/// line by accident; call [`BearerToken::expose`] to hand it to the verifier.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BearerToken(String);

impl BearerToken {
    /// Wraps a token.
    #[cfg(test)]
    pub(crate) fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }
    /// The token text, for [`Verifier::verify`] only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenOrigin {
    /// `Authorization: Bearer <token>`.
    AuthorizationHeader,
    /// `Sec-WebSocket-Protocol: changecast.v1, bearer.<token>`.
    Subprotocol,
    /// `?token=<token>` (only when `auth.allow_query_token`).
    Query,
}

/// What the upgrade request carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenSource {
    /// The token and where it came from; `None` when the client sent none
    /// (it may still send `{"type":"auth"}` as its first message).
    pub(crate) token: Option<(TokenOrigin, BearerToken)>,
    /// The subprotocol the server must echo in its 101 response, when the
    /// client offered [`SUBPROTOCOL`]. Browsers fail the handshake when they
    /// offered subprotocols and none is echoed; echoing the `bearer.` entry
    /// instead would copy the token into the response.
    pub(crate) subprotocol: Option<&'static str>,
}

/// Finds the token of a WebSocket upgrade request. Pure; never logs.
///
/// Precedence: `Authorization: Bearer <t>` (case-insensitive scheme), then
/// the subprotocol convention, then `?token=` when `allow_query` is set.
///
/// Subprotocol convention (for browsers, which cannot set headers on a
/// WebSocket): the client offers two values,
/// `new WebSocket(url, ["changecast.v1", "bearer." + jwt])`. A JWT's
/// characters (base64url and `.`) are all valid in a subprotocol token. The
/// server must echo `changecast.v1` ([`TokenSource::subprotocol`]), never the
/// token entry.
///
/// `query` is the raw query string (without `?`); the value is percent-decoded.
pub(crate) fn token_from_headers(
    headers: &HeaderMap,
    allow_query: bool,
    query: Option<&str>,
) -> TokenSource {
    let mut offered_v1 = false;
    let mut proto_token = None;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',').map(str::trim) {
            if item == SUBPROTOCOL {
                offered_v1 = true;
            } else if let Some(t) = item.strip_prefix(BEARER_SUBPROTOCOL_PREFIX) {
                if !t.is_empty() && proto_token.is_none() {
                    proto_token = Some(t.to_owned());
                }
            }
        }
    }
    let subprotocol = offered_v1.then_some(SUBPROTOCOL);

    let from_header = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            let t = rest.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !t.is_empty()).then(|| t.to_owned())
        });

    let token = if let Some(t) = from_header {
        Some((TokenOrigin::AuthorizationHeader, BearerToken(t)))
    } else if let Some(t) = proto_token {
        Some((TokenOrigin::Subprotocol, BearerToken(t)))
    } else if allow_query {
        query
            .and_then(query_token)
            .map(|t| (TokenOrigin::Query, BearerToken(t)))
    } else {
        None
    };
    TokenSource { token, subprotocol }
}

fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if k != "token" {
            return None;
        }
        let t = percent_decode(v)?;
        (!t.is_empty()).then_some(t)
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::path::PathBuf;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
    const NOW: u64 = 1_700_000_000;

    #[test]
    fn reasons_list_every_failure_label() {
        let all = [
            AuthError::Missing,
            AuthError::Malformed("x"),
            AuthError::BadSignature,
            AuthError::AlgNotAllowed,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::BadIssuer,
            AuthError::BadAudience,
            AuthError::UnknownKid,
            AuthError::BadClaims(String::new()),
        ];
        let reasons: Vec<&str> = all.iter().map(AuthError::reason).collect();
        assert_eq!(reasons, AuthError::REASONS);
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn pem(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).unwrap()
    }

    fn env(name: &str) -> Option<std::ffi::OsString> {
        (name == DEFAULT_SECRET_ENV).then(|| SECRET.into())
    }

    /// `toml_text` as the `[auth]` table of an otherwise empty config file.
    fn config(toml_text: &str) -> Result<AuthConfig, ConfigError> {
        config_with_env(toml_text, &env)
    }

    fn config_with_env(
        toml_text: &str,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<AuthConfig, ConfigError> {
        Config::from_toml_str_with_env(&format!("[auth]\n{toml_text}"), "t.toml", env)
            .map(|c| c.auth)
    }

    fn verifier(toml_text: &str) -> Verifier {
        Verifier::new(&config(toml_text).unwrap())
    }

    fn claims() -> Value {
        json!({ "sub": "alice", "exp": NOW + 600 })
    }

    fn with(extra: Value) -> Value {
        let mut c = claims();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn hs(alg: Algorithm, claims: &Value, secret: &[u8]) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn hs256(claims: &Value) -> String {
        hs(Algorithm::HS256, claims, SECRET.as_bytes())
    }

    fn signed(alg: Algorithm, kid: Option<&str>, claims: &Value, private_pem: &str) -> String {
        let bytes = pem(private_pem);
        let key = match alg.family() {
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&bytes),
            _ => EncodingKey::from_rsa_pem(&bytes),
        }
        .unwrap();
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        encode(&h, claims, &key).unwrap()
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

    /// A token with an arbitrary header, signed (when `sign`) with HS256 over the real signing input.
    fn raw_token(header: &Value, claims: &Value, sig: &str) -> String {
        format!(
            "{}.{}.{sig}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        )
    }

    fn err(v: &Verifier, token: &str) -> AuthError {
        v.verify(token, now()).unwrap_err()
    }

    #[test]
    fn b64url_round_trip() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar\u{ff}"] {
            assert_eq!(b64url_decode(&b64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64url_decode("a+b/"), None);
        assert_eq!(b64url_decode("abcde"), None);
    }

    #[test]
    fn valid_hmac_tokens() {
        let v = verifier(r#"algorithms = ["HS256", "HS384", "HS512"]"#);
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let p = v
                .verify(&hs(alg, &claims(), SECRET.as_bytes()), now())
                .unwrap();
            assert_eq!(p.subject.as_deref(), Some("alice"), "{alg:?}");
            assert_eq!(
                p.expires_at,
                Some(UNIX_EPOCH + Duration::from_secs(NOW + 600))
            );
        }
    }

    #[test]
    fn valid_rs256_es256_and_pem_kid_is_ignored() {
        let rs = verifier(&format!(
            "algorithms = [\"RS256\"]\npublic_key_file = {:?}",
            fixture("rsa_public.pem")
        ));
        assert!(rs
            .verify(
                &signed(Algorithm::RS256, None, &claims(), "rsa_private.pem"),
                now()
            )
            .is_ok());
        // With a PEM key and no JWKS, a kid in the header is irrelevant.
        assert!(rs
            .verify(
                &signed(Algorithm::RS256, Some("k"), &claims(), "rsa_private.pem"),
                now()
            )
            .is_ok());
        let es = verifier(&format!(
            "algorithms = [\"ES256\"]\npublic_key_file = {:?}",
            fixture("ec_public.pem")
        ));
        assert!(es
            .verify(
                &signed(Algorithm::ES256, None, &claims(), "ec_private.pem"),
                now()
            )
            .is_ok());
    }

    fn jwks_file(dir: &tempfile::TempDir) -> PathBuf {
        let mut keys = Vec::new();
        for (kid, private, alg) in [
            ("rsa-1", "rsa_private.pem", Algorithm::RS256),
            ("ec-1", "ec_private.pem", Algorithm::ES256),
        ] {
            let bytes = pem(private);
            let ek = match alg.family() {
                AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&bytes),
                _ => EncodingKey::from_rsa_pem(&bytes),
            }
            .unwrap();
            let mut jwk = Jwk::from_encoding_key(&ek, alg).unwrap();
            jwk.common.key_id = Some(kid.to_owned());
            keys.push(serde_json::to_value(jwk).unwrap());
        }
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
        path
    }

    #[test]
    fn jwks_selects_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(&format!(
            "algorithms = [\"RS256\", \"ES256\"]\njwks_file = {:?}",
            jwks_file(&dir)
        ));
        let rs = signed(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(),
            "rsa_private.pem",
        );
        let es = signed(Algorithm::ES256, Some("ec-1"), &claims(), "ec_private.pem");
        assert!(v.verify(&rs, now()).is_ok());
        assert!(v.verify(&es, now()).is_ok());

        let unknown = signed(
            Algorithm::RS256,
            Some("rsa-9"),
            &claims(),
            "rsa_private.pem",
        );
        assert_eq!(err(&v, &unknown), AuthError::UnknownKid);
        assert_eq!(err(&v, &unknown).code(), "token_unknown_kid");
        // No kid: the only RSA key is used.
        let no_kid = signed(Algorithm::RS256, None, &claims(), "rsa_private.pem");
        assert!(v.verify(&no_kid, now()).is_ok());
        // A kid naming the EC key on an RS256 token cannot verify.
        let crossed = signed(Algorithm::RS256, Some("ec-1"), &claims(), "rsa_private.pem");
        assert_eq!(err(&v, &crossed), AuthError::BadSignature);
        // Signed by a key that is not in the set, under a listed kid.
        let forged = signed(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(),
            "rsa2_private.pem",
        );
        assert_eq!(err(&v, &forged), AuthError::BadSignature);
    }

    #[test]
    fn jwks_without_kid_and_two_keys_of_a_family_is_unknown_kid() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = Vec::new();
        for (kid, private) in [("a", "rsa_private.pem"), ("b", "rsa2_private.pem")] {
            let ek = EncodingKey::from_rsa_pem(&pem(private)).unwrap();
            let mut jwk = Jwk::from_encoding_key(&ek, Algorithm::RS256).unwrap();
            jwk.common.key_id = Some(kid.into());
            keys.push(jwk);
        }
        let path = dir.path().join("jwks.json");
        std::fs::write(
            &path,
            serde_json::to_string(&json!({ "keys": keys })).unwrap(),
        )
        .unwrap();
        let v = verifier(&format!("algorithms = [\"RS256\"]\njwks_file = {path:?}"));
        let b = signed(Algorithm::RS256, Some("b"), &claims(), "rsa2_private.pem");
        assert!(v.verify(&b, now()).is_ok());
        let no_kid = signed(Algorithm::RS256, None, &claims(), "rsa_private.pem");
        assert_eq!(err(&v, &no_kid), AuthError::UnknownKid);
    }

    #[test]
    fn missing_and_malformed() {
        let v = verifier("");
        assert_eq!(err(&v, ""), AuthError::Missing);
        assert_eq!(err(&v, "   "), AuthError::Missing);
        assert_eq!(err(&v, "").code(), "token_missing");
        for bad in [
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.e30.sig",
            "e30.e30.sig",         // header {} has no alg
            "bm90IGpzb24.e30.sig", // header "not json"
        ] {
            assert!(
                matches!(err(&v, bad), AuthError::Malformed(_)),
                "{bad}: {:?}",
                err(&v, bad)
            );
        }
        let payload_not_json = format!("{}.{}.sig", b64(br#"{"alg":"HS256"}"#), b64(b"not json"));
        assert!(matches!(
            err(&v, &payload_not_json),
            AuthError::Malformed(_) | AuthError::BadSignature
        ));
        let huge = format!("{}.e30.sig", "A".repeat(MAX_TOKEN_LEN));
        assert_eq!(err(&v, &huge), AuthError::Malformed("token is too long"));
        let crit = raw_token(&json!({"alg": "HS256", "crit": ["x"]}), &claims(), "sig");
        assert!(matches!(err(&v, &crit), AuthError::Malformed(_)));
    }

    #[test]
    fn wrong_signature() {
        let v = verifier("");
        let other = hs(
            Algorithm::HS256,
            &claims(),
            b"another-secret-another-secret-another",
        );
        assert_eq!(err(&v, &other), AuthError::BadSignature);
        // Claims altered after signing.
        let good = hs256(&claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let evil = b64(json!({"sub": "admin", "role": "admin", "exp": NOW + 600})
            .to_string()
            .as_bytes());
        parts[1] = &evil;
        assert_eq!(err(&v, &parts.join(".")), AuthError::BadSignature);
        // RSA key pair that is not the configured one.
        let rs = verifier(&format!(
            "algorithms = [\"RS256\"]\npublic_key_file = {:?}",
            fixture("rsa_public.pem")
        ));
        let t = signed(Algorithm::RS256, None, &claims(), "rsa2_private.pem");
        assert_eq!(err(&rs, &t), AuthError::BadSignature);
        assert_eq!(err(&rs, &t).code(), "token_bad_signature");
    }

    #[test]
    fn alg_none_and_unpinned_algorithms() {
        let v = verifier("");
        for alg in ["none", "None", "NONE", "HS1", ""] {
            let t = raw_token(&json!({"alg": alg, "typ": "JWT"}), &claims(), "");
            assert_eq!(err(&v, &t), AuthError::AlgNotAllowed, "{alg}");
        }
        let hs512 = hs(Algorithm::HS512, &claims(), SECRET.as_bytes());
        assert_eq!(err(&v, &hs512), AuthError::AlgNotAllowed);
        assert_eq!(err(&v, &hs512).code(), "token_alg_not_allowed");

        let rs = verifier(&format!(
            "algorithms = [\"RS256\"]\npublic_key_file = {:?}",
            fixture("rsa_public.pem")
        ));
        // Same RSA key, but PS256 is not pinned.
        let ps = signed(Algorithm::PS256, None, &claims(), "rsa_private.pem");
        assert_eq!(err(&rs, &ps), AuthError::AlgNotAllowed);
    }

    #[test]
    fn key_confusion_hs256_signed_with_the_public_key() {
        let rs = verifier(&format!(
            "algorithms = [\"RS256\"]\npublic_key_file = {:?}",
            fixture("rsa_public.pem")
        ));
        let public = pem("rsa_public.pem");
        let admin = with(json!({"role": "admin"}));
        let t = hs(Algorithm::HS256, &admin, &public);
        assert_eq!(err(&rs, &t), AuthError::AlgNotAllowed);
        // Even the trimmed PEM body as secret.
        let body = String::from_utf8(public).unwrap();
        let t = hs(Algorithm::HS256, &admin, body.trim().as_bytes());
        assert_eq!(err(&rs, &t), AuthError::AlgNotAllowed);
    }

    #[test]
    fn expiry_and_not_before_with_leeway() {
        let v = verifier(r#"leeway = "30s""#);
        let at = |exp: u64| hs256(&with(json!({ "exp": exp })));
        assert_eq!(err(&v, &at(NOW - 31)), AuthError::Expired);
        assert_eq!(err(&v, &at(NOW - 30)), AuthError::Expired);
        assert!(v.verify(&at(NOW - 29), now()).is_ok());
        assert_eq!(err(&v, &at(NOW - 31)).code(), "token_expired");
        // The same token, later.
        let t = at(NOW + 60);
        assert!(v.verify(&t, now()).is_ok());
        assert_eq!(
            v.verify(&t, now() + Duration::from_secs(90)).unwrap_err(),
            AuthError::Expired
        );
        // Fractional NumericDate.
        let frac = hs256(&with(json!({ "exp": NOW as f64 + 0.5 })));
        assert!(verifier(r#"leeway = "0s""#).verify(&frac, now()).is_ok());

        let nbf = |n: u64| hs256(&with(json!({ "nbf": n })));
        assert_eq!(err(&v, &nbf(NOW + 31)), AuthError::NotYetValid);
        assert_eq!(err(&v, &nbf(NOW + 31)).code(), "token_not_yet_valid");
        assert!(v.verify(&nbf(NOW + 30), now()).is_ok());
        assert!(v.verify(&nbf(NOW - 1000), now()).is_ok());
        let nbf_str = hs256(&with(json!({ "nbf": "soon" })));
        assert!(matches!(err(&v, &nbf_str), AuthError::BadClaims(_)));
    }

    #[test]
    fn exp_must_be_a_present_number() {
        let v = verifier("");
        let as_string = hs256(&json!({ "sub": "alice", "exp": (NOW + 600).to_string() }));
        let e = err(&v, &as_string);
        assert!(matches!(e, AuthError::BadClaims(_)), "{e:?}");
        assert_eq!(e.code(), "token_bad_claims");
        let missing = hs256(&json!({ "sub": "alice" }));
        assert!(matches!(err(&v, &missing), AuthError::BadClaims(_)));
        for exp in [json!(-5), json!(1e300), json!(null), json!(true)] {
            let t = hs256(&json!({ "sub": "alice", "exp": exp }));
            assert!(matches!(err(&v, &t), AuthError::BadClaims(_)), "{exp}");
        }
    }

    #[test]
    fn issuer_and_audience() {
        let v = verifier(
            r#"issuer = "https://auth.example"
audience = ["dashboard", "app"]"#,
        );
        let ok = with(json!({"iss": "https://auth.example", "aud": "app"}));
        assert!(v.verify(&hs256(&ok), now()).is_ok());
        let list_aud = with(json!({"iss": "https://auth.example", "aud": ["other", "dashboard"]}));
        assert!(v.verify(&hs256(&list_aud), now()).is_ok());

        let bad_iss = with(json!({"iss": "https://evil.example", "aud": "app"}));
        assert_eq!(err(&v, &hs256(&bad_iss)), AuthError::BadIssuer);
        assert_eq!(err(&v, &hs256(&bad_iss)).code(), "token_bad_issuer");
        let no_iss = with(json!({"aud": "app"}));
        assert_eq!(err(&v, &hs256(&no_iss)), AuthError::BadIssuer);

        let bad_aud = with(json!({"iss": "https://auth.example", "aud": "billing"}));
        assert_eq!(err(&v, &hs256(&bad_aud)), AuthError::BadAudience);
        assert_eq!(err(&v, &hs256(&bad_aud)).code(), "token_bad_audience");
        let no_aud = with(json!({"iss": "https://auth.example"}));
        assert_eq!(err(&v, &hs256(&no_aud)), AuthError::BadAudience);

        // Unconfigured: iss and aud are not checked at all.
        let open = verifier("");
        assert!(open.verify(&hs256(&bad_aud), now()).is_ok());
    }

    #[test]
    fn subject_claim_rules() {
        let v = verifier("");
        for c in [
            json!({"exp": NOW + 60}),
            json!({"exp": NOW + 60, "sub": 42}),
            json!({"exp": NOW + 60, "sub": ""}),
        ] {
            assert!(
                matches!(err(&v, &hs256(&c)), AuthError::BadClaims(_)),
                "{c}"
            );
        }
    }

    #[test]
    fn principal_from_configured_claims() {
        let v = verifier(
            r#"subject_claim = "userId"
role_claim = "app_metadata.roles"
stores_claim = "storeIds"
store_roles = ["seller"]"#,
        );
        let t = hs256(&json!({
            "exp": NOW + 60,
            "userId": "65F0A1B2C3D4E5F601234567",
            "app_metadata": { "roles": ["viewer", "seller"] },
            "storeIds": ["s1", {"$oid": "AAAAAAAAAAAAAAAAAAAAAAAA"}, 17, "s1", ""],
        }));
        let p = v.verify(&t, now()).unwrap();
        assert_eq!(p.subject.as_deref(), Some("65f0a1b2c3d4e5f601234567"));
        assert_eq!(p.role.as_deref(), Some("seller"));
        assert!(p.is_store_staff && !p.is_admin);
        assert_eq!(p.stores, vec!["s1", "aaaaaaaaaaaaaaaaaaaaaaaa", "17"]);

        let bad_stores = hs256(&json!({"exp": NOW + 60, "userId": "u", "storeIds": [true]}));
        assert!(matches!(err(&v, &bad_stores), AuthError::BadClaims(_)));
        let bad_role =
            hs256(&json!({"exp": NOW + 60, "userId": "u", "app_metadata": {"roles": 3}}));
        assert!(matches!(err(&v, &bad_role), AuthError::BadClaims(_)));
        let too_many: Vec<String> = (0..=MAX_STORES_PER_TOKEN)
            .map(|i| format!("s{i}"))
            .collect();
        let many = hs256(&json!({"exp": NOW + 60, "userId": "u", "storeIds": too_many}));
        assert!(matches!(err(&v, &many), AuthError::BadClaims(_)));
        // A single string store id.
        let one = hs256(
            &json!({"exp": NOW + 60, "userId": "u", "storeIds": "s9", "app_metadata": {"roles": ["seller"]}}),
        );
        assert_eq!(v.verify(&one, now()).unwrap().stores, vec!["s9"]);
    }

    #[test]
    fn auto_rooms() {
        let v = verifier("");
        let rooms = |c: Value| -> Vec<String> {
            v.verify(&hs256(&c), now())
                .unwrap()
                .auto_rooms()
                .iter()
                .map(|r| r.as_str().to_owned())
                .collect()
        };
        assert_eq!(rooms(claims()), vec!["customer:alice"]);
        assert_eq!(
            rooms(with(json!({"role": "store_owner", "stores": ["s1", "s2"]}))),
            vec!["store:s1", "store:s2"]
        );
        assert_eq!(
            rooms(with(json!({"role": "admin", "stores": ["s1"]}))),
            vec!["admin", "store:s1"]
        );
        // Ids that are not room ids are skipped, the rest kept.
        assert_eq!(
            rooms(with(
                json!({"sub": "a/b", "role": "staff", "stores": ["ok", "x:y", "../etc"]})
            )),
            vec!["store:ok"]
        );
        assert!(rooms(with(json!({"sub": "a b"}))).is_empty());
        // The stores claim grants store rooms only to staff and admin roles.
        for role in [
            json!("customer"),
            json!("visitor"),
            json!(null),
            json!(["viewer"]),
        ] {
            let p = v
                .verify(
                    &hs256(&with(json!({"role": role, "stores": ["s1"]}))),
                    now(),
                )
                .unwrap();
            assert!(p.stores.is_empty(), "role {role} kept its stores claim");
            assert_eq!(
                p.auto_rooms()
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>(),
                vec!["customer:alice"]
            );
        }
        assert_eq!(
            rooms(with(json!({"role": ["viewer", "staff"], "stores": ["s1"]}))),
            vec!["store:s1"]
        );
        assert!(Principal::anonymous().auto_rooms().is_empty());
    }

    #[test]
    fn codes_and_reasons_are_distinct_and_messages_lack_the_token() {
        let all = [
            AuthError::Missing,
            AuthError::Malformed("x"),
            AuthError::BadSignature,
            AuthError::AlgNotAllowed,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::BadIssuer,
            AuthError::BadAudience,
            AuthError::UnknownKid,
            AuthError::BadClaims("exp".into()),
        ];
        let codes: HashSet<_> = all.iter().map(AuthError::code).collect();
        let reasons: HashSet<_> = all.iter().map(AuthError::reason).collect();
        assert_eq!(codes.len(), all.len());
        assert_eq!(reasons.len(), all.len());
        for e in &all {
            assert_eq!(e.code(), format!("token_{}", e.reason()));
            let m = e.to_string();
            assert_eq!(m, m.to_lowercase());
        }
        let v = verifier("");
        let t = hs(
            Algorithm::HS256,
            &claims(),
            b"wrong-wrong-wrong-wrong-wrong-wrong",
        );
        let e = err(&v, &t);
        assert!(
            !e.to_string().contains(&t) && !format!("{e:?}").contains(t.split('.').nth(2).unwrap())
        );
        let m = Metrics::new();
        e.record(&m);
        assert_eq!(
            m.auth_failures
                .get_or_create(&ReasonLabels {
                    reason: "bad_signature"
                })
                .get(),
            1
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = config("").unwrap();
        let dbg = format!("{c:?} {:?}", Verifier::new(&c));
        assert!(!dbg.contains(SECRET), "{dbg}");
        assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
        assert!(dbg.contains("redacted"));
        let t = BearerToken::new("eyJ.secret.token");
        assert_eq!(format!("{t:?}"), "BearerToken(<redacted>)");
    }

    #[test]
    fn config_defaults() {
        let c = config("").unwrap();
        assert_eq!(c.algorithms, vec![Algorithm::HS256]);
        assert_eq!(c.leeway, DEFAULT_LEEWAY);
        assert_eq!(c.claims.subject, "sub");
        assert_eq!(c.claims.role, "role");
        assert_eq!(c.claims.stores, "stores");
        assert_eq!(c.admin_roles, vec!["admin"]);
        assert_eq!(
            c.store_roles,
            vec!["store", "store_owner", "seller", "staff"]
        );
        assert!(!c.allow_query_token && !c.allow_anonymous_storefront);
        assert_eq!(c.order_lookup, OrderLookupConfig::default());
        assert!(c.issuer.is_none() && c.audience.is_none());
    }

    #[test]
    fn config_errors_name_the_key() {
        let key = |toml_text: &str| config(toml_text).unwrap_err().key().to_owned();
        let e = config(r#"secret_env = "NOPE""#).unwrap_err();
        assert_eq!(e.key(), "auth.secret_env");
        assert!(e.to_string().contains("NOPE"));
        let empty = config_with_env("", &|_| Some("".into()));
        assert_eq!(empty.unwrap_err().key(), "auth.secret_env");

        assert_eq!(key(r#"algorithms = ["none"]"#), "auth.algorithms");
        assert_eq!(key(r#"algorithms = ["HS999"]"#), "auth.algorithms");
        assert_eq!(key(r#"algorithms = []"#), "auth.algorithms");
        let mixed = format!(
            "algorithms = [\"HS256\", \"RS256\"]\npublic_key_file = {:?}",
            fixture("rsa_public.pem")
        );
        let e = config(&mixed).unwrap_err();
        assert_eq!(e.key(), "auth.algorithms");
        assert!(e.to_string().contains("mixed"));

        assert_eq!(key(r#"algorithms = ["RS256"]"#), "auth.public_key_file");
        let e = config(
            r#"algorithms = ["RS256"]
public_key_file = "/nonexistent/key.pem""#,
        )
        .unwrap_err();
        assert_eq!(e.key(), "auth.public_key_file");
        assert!(e.to_string().contains("/nonexistent/key.pem"), "{e}");
        // An EC key where RS256 is configured.
        let wrong = format!(
            "algorithms = [\"RS256\"]\npublic_key_file = {:?}",
            fixture("ec_public.pem")
        );
        assert_eq!(key(&wrong), "auth.public_key_file");

        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("jwks.json");
        std::fs::write(&junk, "{not json").unwrap();
        assert_eq!(
            key(&format!("algorithms = [\"RS256\"]\njwks_file = {junk:?}")),
            "auth.jwks_file"
        );
        std::fs::write(&junk, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
        assert_eq!(
            key(&format!("algorithms = [\"RS256\"]\njwks_file = {junk:?}")),
            "auth.jwks_file"
        );
        // An encryption key is skipped; the signature key next to it is used.
        let ek = EncodingKey::from_rsa_pem(&pem("rsa_private.pem")).unwrap();
        let mut sig =
            serde_json::to_value(Jwk::from_encoding_key(&ek, Algorithm::RS256).unwrap()).unwrap();
        sig["kid"] = json!("sig");
        let mut enc = sig.clone();
        enc["kid"] = json!("enc");
        enc["alg"] = json!("RSA-OAEP");
        std::fs::write(&junk, json!({ "keys": [enc, sig] }).to_string()).unwrap();
        let c = config(&format!("algorithms = [\"RS256\"]\njwks_file = {junk:?}")).unwrap();
        assert!(format!("{c:?}").contains("\"sig\"") && !format!("{c:?}").contains("\"enc\""));
        std::fs::write(&junk, r#"{"keys":[]}"#).unwrap();
        assert_eq!(
            key(&format!("algorithms = [\"RS256\"]\njwks_file = {junk:?}")),
            "auth.jwks_file"
        );

        assert_eq!(key(r#"leeway = "5""#), "auth.leeway");
        assert_eq!(key(r#"leeway = "10m""#), "auth.leeway");
        assert_eq!(key(r#"audience = []"#), "auth.audience");
        assert_eq!(key(r#"issuer = """#), "auth.issuer");
        assert_eq!(key(r#"subject_claim = """#), "auth.subject_claim");
        assert_eq!(key("order_cache_capacity = 0"), "auth.order_cache_capacity");
        assert_eq!(
            key(r#"order_lookup_timeout = "0s""#),
            "auth.order_lookup_timeout"
        );
        assert_eq!(key(r#"order_cache_ttl = "soon""#), "auth.order_cache_ttl");

        assert_eq!(key("algorithm = [\"HS256\"]"), "auth.algorithm");
    }

    #[test]
    fn config_errors_point_at_the_value() {
        let at = |toml_text: &str| match config(toml_text).unwrap_err() {
            ConfigError::Invalid { key, at, .. } => (key, at.line_col),
            other => panic!("{other:?}"),
        };
        // Line 1 is the `[auth]` header the helper writes.
        let cases = [
            ("leeway = \"10m\"", "auth.leeway", (2, 10)),
            (
                "issuer = \"x\"\nsubject_claim = \"\"",
                "auth.subject_claim",
                (3, 17),
            ),
            (
                "order_cache_ttl = \"soon\"",
                "auth.order_cache_ttl",
                (2, 19),
            ),
            (
                "algorithms = [\"RS256\", \"HS999\"]",
                "auth.algorithms",
                (2, 14),
            ),
            ("secret_env = \"NOPE\"", "auth.secret_env", (2, 14)),
        ];
        for (text, key, pos) in cases {
            assert_eq!(at(text), (key.to_owned(), Some(pos)), "{text}");
        }
        // Nothing in the file to point at: the default variable is unset.
        assert_eq!(
            config_with_env("", &|_| None)
                .map(|_| ())
                .map_err(|e| match e {
                    ConfigError::Invalid { at, .. } => at.line_col,
                    other => panic!("{other:?}"),
                }),
            Err(None)
        );
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn found(s: &TokenSource) -> Option<(TokenOrigin, &str)> {
        s.token.as_ref().map(|(o, t)| (*o, t.expose()))
    }

    #[test]
    fn token_extraction() {
        let none = token_from_headers(&HeaderMap::new(), true, None);
        assert_eq!(none.token, None);
        assert_eq!(none.subprotocol, None);

        let bearer =
            token_from_headers(&headers(&[("authorization", "Bearer a.b.c")]), false, None);
        assert_eq!(
            found(&bearer),
            Some((TokenOrigin::AuthorizationHeader, "a.b.c"))
        );
        let lower = token_from_headers(
            &headers(&[("authorization", "bearer  a.b.c ")]),
            false,
            None,
        );
        assert_eq!(
            found(&lower),
            Some((TokenOrigin::AuthorizationHeader, "a.b.c"))
        );
        let basic = token_from_headers(
            &headers(&[("authorization", "Basic dXNlcjpwYXNz")]),
            false,
            None,
        );
        assert_eq!(basic.token, None);

        let proto = token_from_headers(
            &headers(&[("sec-websocket-protocol", "changecast.v1, bearer.x.y.z")]),
            false,
            None,
        );
        assert_eq!(found(&proto), Some((TokenOrigin::Subprotocol, "x.y.z")));
        assert_eq!(proto.subprotocol, Some("changecast.v1"));
        // Two header lines, token first.
        let split = token_from_headers(
            &headers(&[
                ("sec-websocket-protocol", "bearer.x.y.z"),
                ("sec-websocket-protocol", "changecast.v1"),
            ]),
            false,
            None,
        );
        assert_eq!(found(&split), Some((TokenOrigin::Subprotocol, "x.y.z")));
        assert_eq!(split.subprotocol, Some(SUBPROTOCOL));
        // Token offered without the protocol: found, but nothing to echo.
        let bare = token_from_headers(
            &headers(&[("sec-websocket-protocol", "bearer.x.y.z")]),
            false,
            None,
        );
        assert_eq!(bare.subprotocol, None);
        assert!(bare.token.is_some());

        // Header beats subprotocol beats query.
        let both = token_from_headers(
            &headers(&[
                ("authorization", "Bearer h.h.h"),
                ("sec-websocket-protocol", "changecast.v1, bearer.p.p.p"),
            ]),
            true,
            Some("token=q.q.q"),
        );
        assert_eq!(
            found(&both),
            Some((TokenOrigin::AuthorizationHeader, "h.h.h"))
        );
        assert_eq!(both.subprotocol, Some(SUBPROTOCOL));

        let q = Some("since=abc&token=q%2Eq.q&x=1");
        assert_eq!(token_from_headers(&HeaderMap::new(), false, q).token, None);
        let allowed = token_from_headers(&HeaderMap::new(), true, q);
        assert_eq!(found(&allowed), Some((TokenOrigin::Query, "q.q.q")));
        for bad in [
            "token=",
            "token=%zz",
            "token=%+1",
            "tokens=a.b.c",
            "token=%ff%fe",
        ] {
            assert_eq!(
                token_from_headers(&HeaderMap::new(), true, Some(bad)).token,
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn verifier_exposes_what_the_gateway_needs() {
        let v = verifier("leeway = \"7s\"");
        assert_eq!(v.leeway(), Duration::from_secs(7));
    }
}
