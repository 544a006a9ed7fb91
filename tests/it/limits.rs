//! Integration tests: backpressure, rate limits, pings, origins and hostile frames.
