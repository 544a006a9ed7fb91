//! changecast: MongoDB change streams → normalized events → authenticated WebSocket and Socket.IO rooms.
//!
//! Modules in reading order: `config` (the TOML file, one file per section),
//! `status` (canonical statuses and the status table), `event` and `room` (the
//! vocabulary), `docpath` (dotted paths into BSON) over `bsonscan` (BSON bytes read in place), `normalize` (reading a change
//! and its status) and `route` (rooms and payload allowlists) with `payload` (payloads written as JSON text), `declared` (the one
//! stream engine) with `presets` (orders, payments and settings as streams of it),
//! `mapper` (change → numbered, counted events), `hub` (fan-out and history),
//! `source` (change streams), `checkpoint` (the durable resume token), `pipeline`
//! (source → hub), `auth` (JWT → principal), `gateway` (HTTP, `/ws`,
//! `/socket.io/`), `metrics`, `cli`.

pub mod allocator;
pub mod app;
pub mod auth;
pub mod authz;
pub(crate) mod bsonscan;
pub(crate) mod checkpoint;
pub mod cli;
pub mod config;
pub(crate) mod declared;
pub mod demo;
pub(crate) mod docpath;
pub mod event;
#[cfg(test)]
mod former;
pub mod gateway;
pub mod health;
pub mod hub;
pub mod idcodec;
pub(crate) mod joined;
pub mod mapper;
pub mod metrics;

pub(crate) mod normalize;
pub mod payload;
pub mod pipeline;
mod presets;
pub(crate) mod replay;
pub mod room;
pub(crate) mod roomqueue;
pub(crate) mod route;
pub mod sequence;
pub(crate) mod source;
pub(crate) mod status;
pub mod token;
