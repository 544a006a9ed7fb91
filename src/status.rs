//! Canonical order and payment statuses and the table that maps an app's raw status values to them; knows nothing of TOML or change documents.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

/// Canonical order statuses: the flow `pending → processing → ready_for_pickup |
/// ready_for_delivery → driver_assigned → picked_up → in_transit → delivered`, plus `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum OrderStatus {
    /// `pending`
    Pending,
    /// `processing`
    Processing,
    /// `ready_for_pickup`
    ReadyForPickup,
    /// `ready_for_delivery`
    ReadyForDelivery,
    /// `driver_assigned`
    DriverAssigned,
    /// `picked_up`
    PickedUp,
    /// `in_transit`
    InTransit,
    /// `delivered`
    Delivered,
    /// `cancelled`
    Cancelled,
}

impl OrderStatus {
    /// Every canonical order status.
    pub(crate) const ALL: [OrderStatus; 9] = [
        Self::Pending,
        Self::Processing,
        Self::ReadyForPickup,
        Self::ReadyForDelivery,
        Self::DriverAssigned,
        Self::PickedUp,
        Self::InTransit,
        Self::Delivered,
        Self::Cancelled,
    ];

    /// The canonical name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::ReadyForPickup => "ready_for_pickup",
            Self::ReadyForDelivery => "ready_for_delivery",
            Self::DriverAssigned => "driver_assigned",
            Self::PickedUp => "picked_up",
            Self::InTransit => "in_transit",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a canonical name (exact, lower case).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Position in the flow as a percentage: pending 0, processing 20, ready_* 40,
    /// driver_assigned 55, picked_up 70, in_transit 85, delivered 100.
    ///
    /// `cancelled` is terminal but not a point on the flow, so it has no
    /// progress (`None`) rather than a misleading 0 or 100.
    pub(crate) fn progress(self) -> Option<u8> {
        match self {
            Self::Pending => Some(0),
            Self::Processing => Some(20),
            Self::ReadyForPickup | Self::ReadyForDelivery => Some(40),
            Self::DriverAssigned => Some(55),
            Self::PickedUp => Some(70),
            Self::InTransit => Some(85),
            Self::Delivered => Some(100),
            Self::Cancelled => None,
        }
    }
}

/// What a raw order status maps to: a fixed canonical status, or `ready`,
/// which splits into `ready_for_pickup` / `ready_for_delivery` by the order's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderTarget {
    /// Always this status.
    Fixed(OrderStatus),
    /// `ready_for_pickup` when the order type is a pickup type, else `ready_for_delivery`.
    ReadyByType,
}

impl OrderTarget {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        if s == "ready" {
            Some(Self::ReadyByType)
        } else {
            OrderStatus::parse(s).map(Self::Fixed)
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Fixed(s) => s.as_str(),
            Self::ReadyByType => "ready",
        }
    }
}

impl Serialize for OrderTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Canonical payment statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PaymentStatus {
    /// `pending`
    Pending,
    /// `succeeded`
    Succeeded,
    /// `failed`
    Failed,
    /// `canceled` (Stripe's spelling, which the payment apps use)
    Canceled,
    /// `refunded`
    Refunded,
}

impl PaymentStatus {
    /// Every canonical payment status.
    pub(crate) const ALL: [PaymentStatus; 5] = [
        Self::Pending,
        Self::Succeeded,
        Self::Failed,
        Self::Canceled,
        Self::Refunded,
    ];

    /// The canonical name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Refunded => "refunded",
        }
    }

    /// Parses a canonical name (exact, lower case).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl Serialize for PaymentStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `[status]`: raw status values → canonical ones. Lookups are case-insensitive and trim whitespace.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StatusTable {
    /// Raw order status (lower case) → target; defaults in [`default_order_map`],
    /// `[status.order]` entries are added on top of them.
    pub(crate) order: BTreeMap<String, OrderTarget>,
    /// Order type values (lower case) meaning pickup; anything else is delivery.
    /// Default `["pickup", "collection", "takeaway"]`.
    pub(crate) pickup_types: Vec<String>,
    /// Raw payment status (lower case) → canonical; defaults in [`default_payment_map`],
    /// `[status.payment]` entries are added on top of them.
    pub(crate) payment: BTreeMap<String, PaymentStatus>,
}

impl StatusTable {
    /// The canonical order status of `raw` for an order of type `order_type`; `None` when unknown.
    pub(crate) fn order_status(&self, raw: &str, order_type: Option<&str>) -> Option<OrderStatus> {
        match self.order.get(&*status_key(raw))? {
            OrderTarget::Fixed(s) => Some(*s),
            OrderTarget::ReadyByType => Some(if self.is_pickup(order_type) {
                OrderStatus::ReadyForPickup
            } else {
                OrderStatus::ReadyForDelivery
            }),
        }
    }

    /// Whether `order_type` is one of the pickup types (absent = delivery).
    pub(crate) fn is_pickup(&self, order_type: Option<&str>) -> bool {
        is_pickup_type(&self.pickup_types, order_type)
    }

    /// The canonical payment status of `raw`; `None` when unknown.
    pub(crate) fn payment_status(&self, raw: &str) -> Option<PaymentStatus> {
        self.payment.get(&*status_key(raw)).copied()
    }
}

impl Default for StatusTable {
    fn default() -> Self {
        Self {
            order: default_order_map(),
            pickup_types: vec!["pickup".into(), "collection".into(), "takeaway".into()],
            payment: default_payment_map(),
        }
    }
}

/// Whether `kind` is one of `pickup_types` (lower case), case-insensitively; absent
/// means delivery. The rule of every `ready` split (orders, declared streams).
pub(crate) fn is_pickup_type(pickup_types: &[String], kind: Option<&str>) -> bool {
    kind.is_some_and(|t| {
        let t = status_key(t);
        pickup_types.iter().any(|p| *p == *t)
    })
}

/// `raw` as the tables key it: trimmed, lower case. Borrowed when it already is (the
/// usual case), so a lookup per change costs no copy.
pub(crate) fn status_key(raw: &str) -> Cow<'_, str> {
    let t = raw.trim();
    if t.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(t.to_ascii_lowercase())
    } else {
        Cow::Borrowed(t)
    }
}

/// The default order status map of the Node apps.
pub(crate) fn default_order_map() -> BTreeMap<String, OrderTarget> {
    use OrderStatus::*;
    use OrderTarget::*;
    [
        ("new", Fixed(Pending)),
        ("pending", Fixed(Pending)),
        ("accepted", Fixed(Processing)),
        ("processing", Fixed(Processing)),
        ("packing", Fixed(Processing)),
        ("ready", ReadyByType),
        ("ready_for_pickup", Fixed(ReadyForPickup)),
        ("ready_for_delivery", Fixed(ReadyForDelivery)),
        ("driver_assigned", Fixed(DriverAssigned)),
        ("picked_up", Fixed(PickedUp)),
        ("out_for_delivery", Fixed(InTransit)),
        ("in_transit", Fixed(InTransit)),
        ("completed", Fixed(Delivered)),
        ("delivered", Fixed(Delivered)),
        ("cancelled", Fixed(Cancelled)),
        ("canceled", Fixed(Cancelled)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The default payment status map (Stripe-like values).
pub(crate) fn default_payment_map() -> BTreeMap<String, PaymentStatus> {
    use PaymentStatus::*;
    [
        ("succeeded", Succeeded),
        ("paid", Succeeded),
        ("completed", Succeeded),
        ("pending", Pending),
        ("processing", Pending),
        ("requires_action", Pending),
        ("failed", Failed),
        ("canceled", Canceled),
        ("cancelled", Canceled),
        ("refunded", Refunded),
        ("partially_refunded", Refunded),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_keys_are_trimmed_lower_case_and_borrowed_when_already_so() {
        assert!(matches!(status_key("ready"), Cow::Borrowed("ready")));
        assert!(matches!(status_key("  ready\t"), Cow::Borrowed("ready")));
        assert_eq!(status_key(" Out_For_Delivery "), "out_for_delivery");
        assert!(matches!(status_key("READY"), Cow::Owned(_)));
        // Non-ASCII letters are left as they are, as the tables' keys are.
        assert_eq!(status_key("Éclair"), "Éclair".to_ascii_lowercase());
        let t = StatusTable::default();
        assert_eq!(
            t.order_status(" ACCEPTED ", None),
            t.order_status("accepted", None)
        );
        assert!(is_pickup_type(&["pickup".to_owned()], Some(" PickUp")));
        assert!(!is_pickup_type(&["pickup".to_owned()], Some("delivery")));
    }
}
