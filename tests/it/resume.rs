//! Integration tests: CLI resume flags and history-lost policies.
