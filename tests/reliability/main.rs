//! Reliability and security proof (issue 9): kills, database faults, idle streams, client storms and
//! hostile input, each checked by one ledger-based checker. Fast sizes by default; `RELIABILITY_FULL=1`
//! runs the sizes (scripts/reliability writes RELIABILITY.md from them).
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../it/support.rs"]
mod support;

mod checker;
mod world;

mod clients;
mod faults;
mod hostile;
mod idle;
mod kills;
mod model;
mod restarts;
