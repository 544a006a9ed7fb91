//! The process allocator's two tunings: memory mimalloc frees goes back to the OS only after
//! it has stayed unused for 10 s, not 1 s; and the process's heap uses no transparent huge pages.
//!
//! Why: under a sustained write rate the hub's history frees whole pages as fast as it fills
//! new ones. With mimalloc's default purge delay (1 s) those pages were returned to the OS and
//! faulted back in, as zeroed 2 MiB huge pages, about a thousand times in a 5 s phase of
//! workload T: 8.6% of the server's CPU in `clear_page` while its RSS stayed flat
//! (bench/analysis.md). A 10 s delay, the same order as jemalloc's default decay, removed the
//! churn at the same RSS, and memory freed after a burst still goes back within seconds.
//!
//! `MIMALLOC_PURGE_DELAY` in the environment (mimalloc's own option) wins over this.
//!
//! Huge pages: mimalloc asks for them on its arenas, so the first touch of every 2 MiB of
//! heap made the kernel zero all of it at once. On the virtual machines measured here a
//! fresh page costs far more than the zeroing itself (the host backs it too): profiles of a
//! follow of 60,000 changes put page faults at 15% of the process's CPU (`clear_page`
//! 14.9%, from about 50 faults); with huge pages off, 6% (`clear_page` 0.8%, 17,000 faults
//! of 4 KiB), and workloads T and B read the same within their noise (bench/analysis.md).
//! A fan-out server's heap is many small objects touched a few at a time, which gains
//! little from huge pages' fewer TLB misses; Redis turns them off for its process for the
//! same fault costs.
//! `MIMALLOC_ALLOW_THP` in the environment (mimalloc's own option) wins over this.

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
pub struct Tuning {
    /// The purge delay.
    pub purge: Purge,
    /// Transparent huge pages.
    pub huge_pages: HugePages,
}

/// What [`tune`] did with the purge delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// The purge delay is now [`PURGE_DELAY_MS`].
    Set,
    /// `MIMALLOC_PURGE_DELAY` is set; its value (ms) is in force.
    FromEnvironment(c_long),
    /// The option did not hold mimalloc's documented default, so it may not be the purge
    /// delay in this mimalloc: left alone (value found).
    Unrecognized(c_long),
}

/// What [`tune`] did with transparent huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// Off for this process (`prctl(PR_SET_THP_DISABLE)`).
    Disabled,
    /// `MIMALLOC_ALLOW_THP` is set: mimalloc applied it when it started.
    FromEnvironment,
    /// The kernel refused (the OS error number); the system's setting stays in force.
    Failed(Option<i32>),
}

impl Tuning {
    /// Start-up lines; a warning only when something could not be done.
    pub fn log(self) {
        match self.purge {
            Purge::Set => tracing::debug!(purge_delay_ms = PURGE_DELAY_MS, "allocator tuned"),
            Purge::FromEnvironment(ms) => {
                tracing::info!(purge_delay_ms = ms, "allocator purge delay from MIMALLOC_PURGE_DELAY")
            }
            Purge::Unrecognized(found) => tracing::warn!(
                found,
                "mimalloc's purge delay option is not where this build expects it: left at its default"
            ),
        }
        match self.huge_pages {
            HugePages::Disabled => tracing::debug!("transparent huge pages off for this process"),
            HugePages::FromEnvironment => {
                tracing::info!("transparent huge pages as MIMALLOC_ALLOW_THP says")
            }
            HugePages::Failed(errno) => tracing::warn!(
                ?errno,
                "could not turn transparent huge pages off for this process: the system's setting applies"
            ),
        }
    }
}

/// Sets the purge delay and turns huge pages off, each unless the environment already
/// chooses. Call first thing in `main`, before other threads start: mimalloc's option
/// setters are not thread-safe, and the heap the runtime builds should start without
/// huge pages.
pub fn tune() -> Tuning {
    Tuning {
        purge: tune_purge(),
        huge_pages: tune_huge_pages(),
    }
}

fn tune_purge() -> Purge {
    let current = purge_delay();
    if sets(std::env::vars_os().map(|(k, _)| k), PURGE_OPTIONS) {
        return Purge::FromEnvironment(current);
    }
    if current != MIMALLOC_DEFAULT_MS {
        return Purge::Unrecognized(current);
    }
    // SAFETY: a plain store into mimalloc's option table, done before any other thread of
    // this process exists (see the doc above); the index was checked against its default.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) };
    Purge::Set
}

fn tune_huge_pages() -> HugePages {
    if sets(std::env::vars_os().map(|(k, _)| k), THP_OPTIONS) {
        return HugePages::FromEnvironment;
    }
    disable_huge_pages()
}

#[cfg(target_os = "linux")]
fn disable_huge_pages() -> HugePages {
    // For the whole process, its existing mappings included (mimalloc asked for huge pages
    // on its arena before `main`), and for any process it starts.
    match rustix::thread::disable_transparent_huge_pages(true) {
        Ok(()) => HugePages::Disabled,
        Err(e) => HugePages::Failed(Some(e.raw_os_error())),
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_huge_pages() -> HugePages {
    HugePages::Failed(None)
}

/// mimalloc's environment names for the purge delay (and its old name `reset_delay`).
const PURGE_OPTIONS: &[&str] = &["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"];
/// mimalloc's environment name for transparent huge pages.
const THP_OPTIONS: &[&str] = &["MIMALLOC_ALLOW_THP"];

/// Whether one of `names` is one of `options`: mimalloc reads its options from the
/// environment in either case (`MIMALLOC_PURGE_DELAY`, `mimalloc_purge_delay`).
fn sets(mut names: impl Iterator<Item = std::ffi::OsString>, options: &[&str]) -> bool {
    names.any(|k| {
        k.to_str()
            .is_some_and(|k| options.iter().any(|v| k.eq_ignore_ascii_case(v)))
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
        let purge = |v: &[&str]| sets(names(v).into_iter(), PURGE_OPTIONS);
        assert!(purge(&["PATH", "MIMALLOC_PURGE_DELAY"]));
        assert!(purge(&["mimalloc_purge_delay"]));
        assert!(purge(&["MIMALLOC_RESET_DELAY"]));
        assert!(!purge(&["PATH", "MIMALLOC_VERBOSE", "PURGE_DELAY"]));
        let thp = |v: &[&str]| sets(names(v).into_iter(), THP_OPTIONS);
        assert!(thp(&["mimalloc_allow_thp"]));
        assert!(!thp(&["MIMALLOC_PURGE_DELAY", "ALLOW_THP"]));
    }

    /// The index really is the purge delay of the linked mimalloc: with no environment
    /// override it holds mimalloc's default, and setting it is read back. (If an upgrade
    /// moves the option, `tune` leaves it alone and this test says why.)
    #[test]
    fn the_option_is_mimallocs_purge_delay() {
        if sets(std::env::vars_os().map(|(k, _)| k), PURGE_OPTIONS) {
            eprintln!("MIMALLOC_PURGE_DELAY is set; the default cannot be checked");
            return;
        }
        assert_eq!(
            purge_delay(),
            MIMALLOC_DEFAULT_MS,
            "option {PURGE_DELAY} of the linked mimalloc is not its purge delay"
        );
        assert_eq!(tune_purge(), Purge::Set);
        assert_eq!(purge_delay(), PURGE_DELAY_MS);
    }

    /// Huge pages really are off for the process after tuning (unless the environment
    /// chose), as the kernel reports it.
    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_off_after_tuning() {
        if sets(std::env::vars_os().map(|(k, _)| k), THP_OPTIONS) {
            eprintln!("MIMALLOC_ALLOW_THP is set; mimalloc decides");
            return;
        }
        assert_eq!(tune_huge_pages(), HugePages::Disabled);
        assert_eq!(
            rustix::thread::transparent_huge_pages_are_disabled().ok(),
            Some(true)
        );
    }
}
