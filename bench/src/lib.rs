//! changecast's benchmark harness: load tool, raw-limit server and the suite that writes BENCHMARKS.md.
//!
//! Reading order: `token` (clients' JWTs), `raw` (the raw-limit server),
//! `tracker` (what was sent, what arrived, when), `client` (native and
//! Socket.IO connections), `sink` (the writers: MongoDB or the raw control
//! channel), `procstat` (RSS and CPU of the server under test), `load` (one
//! run against one server), `suite` (every server and size in turn), `follow` (the
//! no-client workload: CPU per change read) and
//! `report` (BENCHMARKS.md) with `plot` (its SVG figures).

pub mod client;
pub mod follow;
pub mod load;
pub mod plot;
pub mod procstat;
pub mod raw;
pub mod report;
pub mod sink;
pub mod suite;
pub mod token;
pub mod tracker;
