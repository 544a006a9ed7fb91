//! `[normalize]`: the memory normalization may use.

use serde::{Deserialize, Serialize};

/// `[normalize]`: memory normalization may use.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NormalizeConfig {
    /// Most documents per stream whose last-seen status and owners are remembered
    /// (for `previousStatus` and for routing deletes without a pre-image); oldest
    /// evicted first. About 200 bytes each. Default 100000; 0 disables.
    pub(crate) state_cache_docs: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNormalize {
    state_cache_docs: Option<usize>,
}

pub(super) fn convert(normalize: RawNormalize) -> NormalizeConfig {
    NormalizeConfig {
        state_cache_docs: normalize.state_cache_docs.unwrap_or(100_000),
    }
}
