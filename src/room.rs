//! Room names: parsing and validation of `kind:id` strings; knows nothing of who may join.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// Longest room id accepted; ids are ObjectId hex strings, UUIDs or slugs in practice.
pub(crate) const MAX_ROOM_ID_LEN: usize = 128;

/// The kinds of room, from design.md's rooms table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum RoomKind {
    /// `customer:{id}`: one customer's orders and payments.
    Customer,
    /// `store:{id}`: one store's orders, payments and private settings.
    Store,
    /// `order:{id}`: one order, for its customer and store.
    Order,
    /// `storefront:{id}`: a shop's public settings, for visitors.
    Storefront,
    /// `admin`: everything, for admins.
    Admin,
}

impl RoomKind {
    /// The prefix before the colon.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RoomKind::Customer => "customer",
            RoomKind::Store => "store",
            RoomKind::Order => "order",
            RoomKind::Storefront => "storefront",
            RoomKind::Admin => "admin",
        }
    }
}

/// A validated room name. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Room {
    kind: RoomKind,
    name: Arc<str>,
}

/// Why a room name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// Empty string.
    #[error("room name is empty")]
    Empty,
    /// Prefix is not one of the known kinds.
    #[error("unknown room kind")]
    UnknownKind,
    /// Id is empty, too long, or has characters outside `[A-Za-z0-9_.-]`.
    #[error("room id must be 1-{MAX_ROOM_ID_LEN} characters of A-Z a-z 0-9 _ . -")]
    BadId,
}

impl Room {
    /// Builds a room of `kind` for `id`, validating the id.
    pub(crate) fn new(kind: RoomKind, id: &str) -> Result<Self, RoomError> {
        if kind == RoomKind::Admin {
            return Ok(Self::admin());
        }
        if !valid_id(id) {
            return Err(RoomError::BadId);
        }
        // Copied once into the shared name: rooms are named per change and audience.
        let name = crate::joined::with_joined(&[kind.as_str(), ":", id], |s| Arc::from(s));
        Ok(Self { kind, name })
    }

    /// The `admin` room.
    pub(crate) fn admin() -> Self {
        // One shared name: every change addresses `admin`.
        static NAME: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "admin".into());
        Self {
            kind: RoomKind::Admin,
            name: NAME.clone(),
        }
    }

    /// Shorthand constructors used by routing.
    pub(crate) fn customer(id: &str) -> Result<Self, RoomError> {
        Self::new(RoomKind::Customer, id)
    }
    /// `store:{id}`.
    pub(crate) fn store(id: &str) -> Result<Self, RoomError> {
        Self::new(RoomKind::Store, id)
    }

    /// The kind.
    pub(crate) fn kind(&self) -> RoomKind {
        self.kind
    }

    /// The id part (empty for `admin`).
    pub(crate) fn id(&self) -> &str {
        match self.name.split_once(':') {
            Some((_, id)) => id,
            None => "",
        }
    }

    /// The full name, e.g. `order:65f0…`.
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ROOM_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && id != "."
        && id != ".."
}

impl FromStr for Room {
    type Err = RoomError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(RoomError::Empty);
        }
        if s == "admin" {
            return Ok(Self::admin());
        }
        let (kind, id) = s.split_once(':').ok_or(RoomError::UnknownKind)?;
        let kind = match kind {
            "customer" => RoomKind::Customer,
            "store" => RoomKind::Store,
            "order" => RoomKind::Order,
            "storefront" => RoomKind::Storefront,
            _ => return Err(RoomError::UnknownKind),
        };
        Self::new(kind, id)
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Room({})", self.name)
    }
}

impl Serialize for Room {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_kinds() {
        let r: Room = "order:65f0a1b2c3d4e5f601234567".parse().unwrap();
        assert_eq!(r.kind(), RoomKind::Order);
        assert_eq!(r.id(), "65f0a1b2c3d4e5f601234567");
        assert_eq!("admin".parse::<Room>().unwrap(), Room::admin());
    }

    #[test]
    fn refuses_tricks() {
        for bad in [
            "",
            "order:",
            "order:*",
            "order:a/b",
            "order:..",
            "store:a b",
            "x:1",
            "order",
            "customer:a:b",
            "order:%2e%2e",
            "storefront:ü",
        ] {
            assert!(bad.parse::<Room>().is_err(), "{bad:?} accepted");
        }
        let long = format!("order:{}", "a".repeat(MAX_ROOM_ID_LEN + 1));
        assert_eq!(long.parse::<Room>(), Err(RoomError::BadId));
    }
}
