//! Bench clients' JWTs: minting HS256 tokens, and reading claims without verifying (the raw server's shortcut).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The claims changecast and the Node peer read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Customer id (or the staff member's id for store tokens).
    pub sub: String,
    /// `customer`, `store` or `admin`.
    pub role: String,
    /// Store ids the token may see.
    #[serde(default)]
    pub stores: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Signs `claims` with HS256.
pub fn mint(secret: &[u8], claims: &Claims) -> anyhow::Result<String> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &key,
    )?)
}

/// Claims of a customer token valid for a day.
pub fn customer(sub: String) -> Claims {
    Claims {
        sub,
        role: "customer".into(),
        stores: Vec::new(),
        exp: in_a_day(),
    }
}

/// Claims of a store-dashboard token for one store, valid for a day.
pub fn store(sub: String, store: String) -> Claims {
    Claims {
        sub,
        role: "store".into(),
        stores: vec![store],
        exp: in_a_day(),
    }
}

fn in_a_day() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now + 86_400
}

/// Reads a JWT's payload without checking its signature; `None` when it is not a JWT.
///
/// Only the raw-limit server uses this: it measures the machine, not auth.
pub fn unverified_claims(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_reads_back_unverified_and_verifies_with_the_secret() {
        let claims = store("s1-owner".into(), "s1".into());
        let token = mint(b"secret", &claims).unwrap();
        assert_eq!(unverified_claims(&token), Some(claims.clone()));

        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.validate_exp = true;
        let decoded = jsonwebtoken::decode::<Claims>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"secret"),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.claims, claims);
    }

    #[test]
    fn garbage_is_not_a_token() {
        assert_eq!(unverified_claims("not a jwt"), None);
        assert_eq!(unverified_claims("a.!!!.c"), None);
    }
}
