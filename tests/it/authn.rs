//! Integration tests: token matrix and expiry mid-connection.
