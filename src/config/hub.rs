//! `[hub]`: the per-session queue and the recovery history, converted into [`HubConfig`].

use std::num::NonZeroUsize;

use serde::Deserialize;

use super::values::{dur, nz, DurationLit};
use crate::hub::HubConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHub {
    history_len: Option<NonZeroUsize>,
    history_age: Option<DurationLit>,
    mailbox_capacity: Option<NonZeroUsize>,
}

pub(super) fn convert(hub: RawHub) -> HubConfig {
    HubConfig {
        history_len: nz(hub.history_len, 10_000),
        history_age: dur(hub.history_age, 300_000),
        mailbox_capacity: nz(hub.mailbox_capacity, 1024),
    }
}
