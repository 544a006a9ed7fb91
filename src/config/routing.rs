//! `[routing]`: what each audience may see of orders and payments, and the settings sections.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::errors::{ConfigError, Ctx};
use super::values::{allowlist, check_path, strs};

/// Fields (dotted paths) each audience may see of one collection's documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Allowlists {
    /// `customer:{id}` rooms.
    pub(crate) customer: Vec<String>,
    /// `store:{id}` rooms.
    pub(crate) store: Vec<String>,
    /// `order:{id}` rooms (joined by the order's customer and store, so no more than the customer sees).
    pub(crate) order: Vec<String>,
    /// The `admin` room.
    pub(crate) admin: Vec<String>,
}

/// One settings section: a group of settings fields with one visibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct SettingsSection {
    /// Section name, e.g. `branding`.
    pub(crate) name: String,
    /// Dotted paths in the settings document belonging to the section.
    pub(crate) fields: Vec<String>,
    /// Public sections also go to `storefront:{id}`; private ones never do.
    pub(crate) public: bool,
}

/// `[routing]`: what each audience may see.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RoutingConfig {
    /// Orders.
    pub(crate) orders: Allowlists,
    /// Payments.
    pub(crate) payments: Allowlists,
    /// Settings sections (sorted by name); fields outside every section are never delivered.
    pub(crate) settings_sections: Vec<SettingsSection>,
}

/// Default order allowlists: conservative; the customer's own delivery address is included.
pub(super) fn default_order_allowlists() -> Allowlists {
    let customer = strs(&[
        "_id",
        "orderNumber",
        "status",
        "orderType",
        "total",
        "subtotal",
        "currency",
        "items",
        "createdAt",
        "updatedAt",
        "estimatedDeliveryTime",
        "deliveryAddress",
    ]);
    let mut store = customer.clone();
    store.extend(strs(&["customerId", "storeId", "customerName", "notes"]));
    Allowlists {
        order: customer.clone(),
        admin: store.clone(),
        customer,
        store,
    }
}

/// Default payment allowlists.
pub(super) fn default_payment_allowlists() -> Allowlists {
    let all = strs(&[
        "_id",
        "orderId",
        "amount",
        "currency",
        "status",
        "method",
        "createdAt",
        "updatedAt",
    ]);
    Allowlists {
        customer: all.clone(),
        store: all.clone(),
        order: all.clone(),
        admin: all,
    }
}

/// The settings sections table of design.md.
pub(super) fn default_settings_sections() -> Vec<SettingsSection> {
    let s = |name: &str, fields: &[&str], public: bool| SettingsSection {
        name: name.to_owned(),
        fields: strs(fields),
        public,
    };
    let mut v = vec![
        s(
            "branding",
            &[
                "storeBanner",
                "storeLogo",
                "shippingPolicy",
                "returnsPolicy",
            ],
            true,
        ),
        s(
            "contact",
            &[
                "aboutStory",
                "contactEmail",
                "socialInstagram",
                "socialTwitter",
                "socialTiktok",
                "socialSnapchat",
                "socialWebsite",
            ],
            true,
        ),
        s("store_status", &["storeActive"], true),
        s("terms", &["termsSource", "termsPdfUrl"], true),
        s("username", &["username"], true),
        s(
            "warehouse",
            &[
                "warehouse",
                "warehouseAddress",
                "warehouseAddress2",
                "warehouseCity",
                "warehouseState",
                "warehouseZip",
                "warehousePostalCode",
                "warehouseCountry",
                "warehousePhone",
            ],
            false,
        ),
        s("payment_provider", &["paymentProvider"], false),
        s(
            "tax_settings",
            &[
                "taxEnabled",
                "taxNexusCountries",
                "taxNexusStates",
                "taxProductCode",
            ],
            false,
        ),
        s(
            "custom_domain",
            &["customDomain", "customDomainVerified"],
            false,
        ),
        s("shipping", &["shippingPrice"], false),
    ];
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    #[serde(default)]
    orders: RawAllowlists,
    #[serde(default)]
    payments: RawAllowlists,
    #[serde(default)]
    settings: BTreeMap<String, Spanned<RawSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAllowlists {
    customer: Option<Vec<Spanned<String>>>,
    store: Option<Vec<Spanned<String>>>,
    order: Option<Vec<Spanned<String>>>,
    admin: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSection {
    fields: Vec<Spanned<String>>,
    public: bool,
}

fn allowlists(
    ctx: &Ctx<'_>,
    key: &str,
    raw: RawAllowlists,
    d: Allowlists,
) -> Result<Allowlists, ConfigError> {
    Ok(Allowlists {
        customer: allowlist(ctx, &format!("{key}.customer"), raw.customer, &d.customer)?,
        store: allowlist(ctx, &format!("{key}.store"), raw.store, &d.store)?,
        order: allowlist(ctx, &format!("{key}.order"), raw.order, &d.order)?,
        admin: allowlist(ctx, &format!("{key}.admin"), raw.admin, &d.admin)?,
    })
}

pub(super) fn convert(ctx: &Ctx<'_>, routing: RawRouting) -> Result<RoutingConfig, ConfigError> {
    let mut sections: BTreeMap<String, SettingsSection> = default_settings_sections()
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    for (name, sec) in routing.settings {
        let key = format!("routing.settings.{name}");
        if name.is_empty() {
            return Err(ctx.err(key, &sec, "section name must not be empty"));
        }
        let sec = sec.into_inner();
        let fields = sec
            .fields
            .iter()
            .map(|p| check_path(ctx, &format!("{key}.fields"), p))
            .collect::<Result<Vec<_>, _>>()?;
        sections.insert(
            name.clone(),
            SettingsSection {
                name,
                fields,
                public: sec.public,
            },
        );
    }
    let routing = RoutingConfig {
        orders: allowlists(
            ctx,
            "routing.orders",
            routing.orders,
            default_order_allowlists(),
        )?,
        payments: allowlists(
            ctx,
            "routing.payments",
            routing.payments,
            default_payment_allowlists(),
        )?,
        settings_sections: sections.into_values().collect(),
    };
    Ok(routing)
}
