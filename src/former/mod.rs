//! The built-in normalizer and router as they were before orders, payments and settings became presets of the stream engine; test-only, the oracle the presets are compared with.
//!
//! Kept whole, with their own unit tests and hostile-change properties, so that the
//! comparison below checks the presets against code whose behaviour is pinned.

// An oracle keeps the former API whole, used or not.
#![allow(dead_code)]

pub(crate) mod normalize;
pub(crate) mod route;
pub(crate) mod shared;

#[cfg(test)]
mod prop;
