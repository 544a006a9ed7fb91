//! `[fields]`: where the documents keep the customer, store, order id, status and order type.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::errors::{ConfigError, Ctx};
use super::values::{path, paths, OneOrMany};

/// `[fields]`: dotted paths into the full document. Where a list is given, the first path present wins.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FieldPaths {
    /// The customer id in orders and payments; default `["customerId"]`.
    pub(crate) customer: Vec<String>,
    /// The store id in orders and payments; default `["storeId", "sellerId"]`.
    pub(crate) store: Vec<String>,
    /// The order id in payments; default `["orderId"]`.
    pub(crate) order_id: Vec<String>,
    /// The order status; default `status`.
    pub(crate) status: String,
    /// The order type (pickup vs delivery); default `orderType`.
    pub(crate) order_type: String,
    /// The payment status; default `status`.
    pub(crate) payment_status: String,
    /// The store id in settings documents; default `["storeId", "sellerId"]`.
    pub(crate) settings_store: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFields {
    customer: Option<Spanned<OneOrMany>>,
    store: Option<Spanned<OneOrMany>>,
    order_id: Option<Spanned<OneOrMany>>,
    status: Option<Spanned<String>>,
    order_type: Option<Spanned<String>>,
    payment_status: Option<Spanned<String>>,
    settings_store: Option<Spanned<OneOrMany>>,
}

pub(super) fn convert(ctx: &Ctx<'_>, fields: RawFields) -> Result<FieldPaths, ConfigError> {
    let fields = FieldPaths {
        customer: paths(ctx, "fields.customer", fields.customer, &["customerId"])?,
        store: paths(ctx, "fields.store", fields.store, &["storeId", "sellerId"])?,
        order_id: paths(ctx, "fields.order_id", fields.order_id, &["orderId"])?,
        status: path(ctx, "fields.status", fields.status, "status")?,
        order_type: path(ctx, "fields.order_type", fields.order_type, "orderType")?,
        payment_status: path(
            ctx,
            "fields.payment_status",
            fields.payment_status,
            "status",
        )?,
        settings_store: paths(
            ctx,
            "fields.settings_store",
            fields.settings_store,
            &["storeId", "sellerId"],
        )?,
    };
    Ok(fields)
}
