//! changecast integration tests: the real app on port 0 against mongo-sim (or `TEST_MONGODB_URI`) through the official driver.
#![allow(clippy::unwrap_used)]

mod support;

mod durability;
mod gateway;
mod pipeline;
