//! The process allocator's one tuning: memory mimalloc frees goes back to the OS only after
//! it has stayed unused for 10 s, not 1 s.
//!
//! Why: under a sustained write rate the hub's history frees whole pages as fast as it fills
//! new ones. With mimalloc's default purge delay (1 s) those pages were returned to the OS and
//! faulted back in, as zeroed 2 MiB huge pages, about a thousand times in a 5 s phase of
//! workload T: 8.6% of the server's CPU in `clear_page` while its RSS stayed flat
//! (bench/analysis.md). A 10 s delay, the same order as jemalloc's default decay, removed the
//! churn at the same RSS, and memory freed after a burst still goes back within seconds.
//!
//! `MIMALLOC_PURGE_DELAY` in the environment (mimalloc's own option) wins over this.

// The one FFI call of the crate: mimalloc exposes its options only through C.
#![allow(unsafe_code)]

use std::ffi::c_long;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e` of mimalloc 3.x, which
/// libmimalloc-sys does not name); [`tune`] checks the option's default before it writes.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc 3.x's default purge delay, which identifies the option.
const MIMALLOC_DEFAULT_MS: c_long = 1000;
/// What changecast sets.
pub const PURGE_DELAY_MS: c_long = 10_000;

/// What [`tune`] did, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// The purge delay is now [`PURGE_DELAY_MS`].
    Set,
    /// `MIMALLOC_PURGE_DELAY` is set; its value (ms) is in force.
    FromEnvironment(c_long),
    /// The option did not hold mimalloc's documented default, so it may not be the purge
    /// delay in this mimalloc: left alone (value found).
    Unrecognized(c_long),
}

impl Tuning {
    /// One start-up line; a warning only when the option was not recognised.
    pub fn log(self) {
        match self {
            Tuning::Set => tracing::debug!(purge_delay_ms = PURGE_DELAY_MS, "allocator tuned"),
            Tuning::FromEnvironment(ms) => {
                tracing::info!(purge_delay_ms = ms, "allocator purge delay from MIMALLOC_PURGE_DELAY")
            }
            Tuning::Unrecognized(found) => tracing::warn!(
                found,
                "mimalloc's purge delay option is not where this build expects it: left at its default"
            ),
        }
    }
}

/// Sets the purge delay unless the environment already does. Call first thing in `main`,
/// before other threads start: mimalloc's option setters are not thread-safe.
pub fn tune() -> Tuning {
    let current = purge_delay();
    if overridden(std::env::vars_os().map(|(k, _)| k)) {
        return Tuning::FromEnvironment(current);
    }
    if current != MIMALLOC_DEFAULT_MS {
        return Tuning::Unrecognized(current);
    }
    // SAFETY: a plain store into mimalloc's option table, done before any other thread of
    // this process exists (see the doc above); the index was checked against its default.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) };
    Tuning::Set
}

/// Whether one of `names` sets the purge delay for mimalloc, which reads its options
/// from the environment in either case (`MIMALLOC_PURGE_DELAY`, `mimalloc_purge_delay`)
/// and under the old name `reset_delay` too.
fn overridden(mut names: impl Iterator<Item = std::ffi::OsString>) -> bool {
    names.any(|k| {
        k.to_str().is_some_and(|k| {
            ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
                .iter()
                .any(|v| k.eq_ignore_ascii_case(v))
        })
    })
}

/// The purge delay in force, in milliseconds.
pub fn purge_delay() -> c_long {
    // SAFETY: reads mimalloc's option table (initialising the entry from the environment
    // on first use); no pointer is involved.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_in_either_case() {
        let names = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert!(overridden(
            names(&["PATH", "MIMALLOC_PURGE_DELAY"]).into_iter()
        ));
        assert!(overridden(names(&["mimalloc_purge_delay"]).into_iter()));
        assert!(overridden(names(&["MIMALLOC_RESET_DELAY"]).into_iter()));
        assert!(!overridden(
            names(&["PATH", "MIMALLOC_VERBOSE", "PURGE_DELAY"]).into_iter()
        ));
    }

    /// The index really is the purge delay of the linked mimalloc: with no environment
    /// override it holds mimalloc's default, and setting it is read back. (If an upgrade
    /// moves the option, `tune` leaves it alone and this test says why.)
    #[test]
    fn the_option_is_mimallocs_purge_delay() {
        if overridden(std::env::vars_os().map(|(k, _)| k)) {
            eprintln!("MIMALLOC_PURGE_DELAY is set; the default cannot be checked");
            return;
        }
        assert_eq!(
            purge_delay(),
            MIMALLOC_DEFAULT_MS,
            "option {PURGE_DELAY} of the linked mimalloc is not its purge delay"
        );
        assert_eq!(tune(), Tuning::Set);
        assert_eq!(purge_delay(), PURGE_DELAY_MS);
    }
}
