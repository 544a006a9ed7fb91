//! changecast: MongoDB change streams → normalized events → authenticated WebSocket and Socket.IO rooms.
//!
//! Modules in reading order: `config` (the TOML file), `event` and `room`
//! (the vocabulary), `docpath` (dotted paths into BSON), `normalize` (reading a
//! change and its status) and `route` (rooms and payload allowlists), `declared`
//! (the one stream engine) with `presets` (orders, payments and settings as
//! streams of it), `mapper` (change → numbered, counted events), `hub` (fan-out
//! and history), `source` (change streams), `checkpoint` (the durable resume
//! token), `pipeline` (source → hub), `auth` (JWT → principal), `gateway` (HTTP,
//! `/ws`, `/socket.io/`), `metrics`, `cli`.

pub mod app;
pub mod auth;
pub mod authz;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod declared;
pub mod demo;
pub mod docpath;
pub mod event;
#[cfg(test)]
mod former;
pub mod gateway;
pub mod health;
pub mod hub;
pub mod idcodec;
pub mod mapper;
pub mod metrics;
pub mod normalize;
pub mod pipeline;
mod presets;
pub mod replay;
pub mod room;
pub mod route;
pub mod sequence;
pub mod source;
pub mod token;
