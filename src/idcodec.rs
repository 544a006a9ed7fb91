//! Opaque event ids on the wire: the resume token, sealed with a key the replicas share, so a client can read nothing from an id or a position.
//!
//! A MongoDB resume token embeds the changed document's namespace and key
//! (SecantusDB's too: `{s, t, n: "app.orders", k: {_id: …}}`), so an id or a
//! `position` shown to someone outside that document's rooms would leak another
//! tenant's order ids. Ids are therefore sealed deterministically: the nonce is an
//! HMAC of the token (a synthetic IV), the token is encrypted with AES-128-GCM
//! under that nonce. Equal tokens give equal ids in every replica that holds the
//! same key, so `since` still works across processes; a client sees random-looking
//! hex, and an id it forged or altered fails authentication and is treated as an
//! id we cannot read (the client is told to resync), never trusted.
//!
//! Ids no longer sort: clients compare them for equality only (the server orders
//! by the token it recovers).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, NONCE_LEN};
use ring::hmac;

use crate::event::EventId;

/// The environment variable holding the id key material when set.
pub(crate) const ID_SECRET_ENV: &str = "CHANGECAST_ID_SECRET";

/// Shortest key material accepted from [`ID_SECRET_ENV`].
pub(crate) const MIN_SECRET_LEN: usize = 16;

/// Longest wire id accepted from a client (hex characters): a 1 KiB token sealed.
pub(crate) const MAX_WIRE_LEN: usize = 2 * (NONCE_LEN + 1024 + 16);

/// Where the key came from, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// `CHANGECAST_ID_SECRET`.
    IdSecret,
    /// Derived from the HMAC JWT secret every replica already shares.
    JwtSecret,
    /// Random for this process: ids are not portable across replicas or restarts.
    Random,
}

/// Seals and opens wire ids.
pub struct IdCodec {
    aead: LessSafeKey,
    siv: hmac::Key,
    source: KeySource,
}

impl std::fmt::Debug for IdCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdCodec")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A one-way derivation of `secret` (the JWT HMAC secret or `CHANGECAST_ID_SECRET`)
/// for the wire-id key: knowing it reveals nothing of the secret it came from.
pub(crate) fn derive_id_material(secret: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(hmac::sign(&key, b"changecast: wire id key material").as_ref());
    out
}

impl IdCodec {
    /// The codec every process configured with the HMAC JWT `secret` (and no id
    /// secret) uses: what an operator's tooling needs to read ids back.
    pub fn for_jwt_secret(secret: &[u8]) -> Self {
        Self::from_secret(&derive_id_material(secret), KeySource::JwtSecret)
    }

    /// A codec keyed by `material` (any length; both keys are derived from it).
    pub(crate) fn from_secret(material: &[u8], source: KeySource) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, material);
        let derive = |label: &[u8]| hmac::sign(&master, label);
        let enc = derive(b"changecast wire ids v1: encryption");
        let mac = derive(b"changecast wire ids v1: synthetic iv");
        let aead = match UnboundKey::new(&AES_128_GCM, &enc.as_ref()[..16]) {
            Ok(k) => LessSafeKey::new(k),
            // A 16-byte slice is always a valid AES-128 key.
            Err(_) => unreachable_key(),
        };
        Self {
            aead,
            siv: hmac::Key::new(hmac::HMAC_SHA256, mac.as_ref()),
            source,
        }
    }

    /// A codec with a random key (tests, and processes with no shared secret).
    pub(crate) fn random() -> Self {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut k);
        Self::from_secret(&k, KeySource::Random)
    }

    /// The wire form of `id`: lowercase hex of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, id: &EventId) -> String {
        let plain = id.as_str().as_bytes();
        let tag = hmac::sign(&self.siv, plain);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&tag.as_ref()[..NONCE_LEN]);
        let mut buf = plain.to_vec();
        let sealed = self.aead.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut buf,
        );
        if sealed.is_err() {
            // Only inputs over ~64 GiB fail; a token never is. Never leak it in clear.
            return String::new();
        }
        let mut out = String::with_capacity(2 * (NONCE_LEN + buf.len()));
        for b in nonce.iter().chain(buf.iter()) {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }

    /// The id a client sent back, or `None` when it is not one of ours (altered,
    /// forged, from a process with another key, or not hex).
    pub fn open(&self, wire: &str) -> Option<EventId> {
        if wire.len() > MAX_WIRE_LEN || wire.len() % 2 != 0 || wire.len() < 2 * (NONCE_LEN + 16) {
            return None;
        }
        let bytes: Vec<u8> = wire
            .as_bytes()
            .chunks(2)
            .map(|p| Some(hex_val(p[0])? << 4 | hex_val(p[1])?))
            .collect::<Option<_>>()?;
        let (n, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).ok()?;
        let mut buf = rest.to_vec();
        let plain = self
            .aead
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .ok()?;
        // The nonce must be the one this plaintext gives: ids are canonical.
        let tag = hmac::sign(&self.siv, plain);
        if tag.as_ref()[..NONCE_LEN] != *n {
            return None;
        }
        let s = std::str::from_utf8(plain).ok()?;
        (!s.is_empty()).then(|| EventId::new(s))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cold]
fn unreachable_key() -> ! {
    // ring accepts every 16-byte AES-128 key; reaching this is a ring bug.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "8266A1B2C3000000012B042C0100296E5A1004ABCDEF0123456789ABCDEF01234567463C5F6964003C6F72642D3100000004";

    #[test]
    fn sealed_ids_are_deterministic_opaque_and_open_only_with_the_key() {
        let a = IdCodec::from_secret(b"replicas share this secret!!", KeySource::JwtSecret);
        let b = IdCodec::from_secret(b"replicas share this secret!!", KeySource::JwtSecret);
        let other = IdCodec::from_secret(b"another deployment's secret!", KeySource::JwtSecret);
        let id = EventId::new(TOKEN);
        let wire = a.seal(&id);
        // Same key, same id: replicas agree.
        assert_eq!(wire, b.seal(&id));
        assert_eq!(b.open(&wire), Some(id.clone()));
        // Nothing of the token shows: not the hex, not the embedded key `ord-1`.
        assert!(!wire.to_ascii_uppercase().contains(&TOKEN[..16]));
        assert!(!wire.contains("6f72642d31"));
        // Another key cannot open it; an altered id is refused.
        assert_eq!(other.open(&wire), None);
        let mut flipped = wire.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(a.open(std::str::from_utf8(&flipped).unwrap()), None);
        // Not hex, too short, odd, or the raw token itself: refused.
        for bad in ["", "zz", "abc", TOKEN, &"0".repeat(MAX_WIRE_LEN + 2)] {
            assert_eq!(a.open(bad), None, "{bad}");
        }
        // Different tokens give unrelated ids.
        let next = a.seal(&EventId::new(format!("{TOKEN}01")));
        assert_ne!(next[..24], wire[..24]);
    }
}
