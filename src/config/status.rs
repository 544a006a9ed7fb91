//! `[status]`: the status-normalization table as written, converted into [`StatusTable`] over its defaults.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::errors::{ConfigError, Ctx};
use crate::status::{
    default_order_map, default_payment_map, OrderStatus, OrderTarget, PaymentStatus, StatusTable,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStatus {
    #[serde(default)]
    order: BTreeMap<String, Spanned<String>>,
    pickup_types: Option<Vec<String>>,
    #[serde(default)]
    payment: BTreeMap<String, Spanned<String>>,
}

pub(super) fn convert(ctx: &Ctx<'_>, status: RawStatus) -> Result<StatusTable, ConfigError> {
    let mut order = default_order_map();
    for (k, v) in status.order {
        let key = format!("status.order.{k}");
        let target = OrderTarget::parse(v.get_ref()).ok_or_else(|| {
            ctx.err(
                &key,
                &v,
                format!(
                    "unknown canonical order status {:?}; expected ready or one of: {}",
                    v.get_ref(),
                    OrderStatus::ALL.map(OrderStatus::as_str).join(", ")
                ),
            )
        })?;
        order.insert(k.trim().to_ascii_lowercase(), target);
    }
    let mut payment = default_payment_map();
    for (k, v) in status.payment {
        let key = format!("status.payment.{k}");
        let target = PaymentStatus::parse(v.get_ref()).ok_or_else(|| {
            ctx.err(
                &key,
                &v,
                format!(
                    "unknown canonical payment status {:?}; expected one of: {}",
                    v.get_ref(),
                    PaymentStatus::ALL.map(PaymentStatus::as_str).join(", ")
                ),
            )
        })?;
        payment.insert(k.trim().to_ascii_lowercase(), target);
    }
    let status = StatusTable {
        order,
        pickup_types: status
            .pickup_types
            .map(|v| v.iter().map(|s| s.trim().to_ascii_lowercase()).collect())
            .unwrap_or_else(|| StatusTable::default().pickup_types),
        payment,
    };
    Ok(status)
}
