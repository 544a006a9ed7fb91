//! changecast integration tests: the real app on port 0 against mongo-sim (or `TEST_MONGODB_URI`) through the official driver.
#![allow(clippy::unwrap_used)]

mod support;

mod authn;
mod authz_matrix;
mod declared;
mod demo;
mod deploy;
mod durability;
mod gateway;
mod limits;
mod ops;
mod oversize;
mod ownership;
mod pipeline;
mod recovery;
mod resume;
mod tenants;
mod unauth;
